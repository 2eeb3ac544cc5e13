// Drives the MLflow UI in headless Chromium and checks what tests/e2e/test_ui.py expects to see.
//
//   node tests/ui/check_ui.mjs <base-url> <experiment-id> <run-id> <out-dir> <model> <run-version> <alias>=<version>...
//
// <run-version>: the version of <model> registered from <run-id> ("" = none); each <alias>=<version>
// must show on that version's row of the model page.
//
// Optional env: DATASET_DIGEST (the runs' dataset digest, checked on the run page's Inputs) and
// LOGGED_MODEL_ID (the run's MLflow 3 logged model, whose page must list the test metrics).
//
// Exits 0 when every check passed, 1 with "FAIL: ..." lines on stderr otherwise, and writes
// one PNG screenshot per page into <out-dir> either way (taken after the checks, so a failing
// page is captured as it was).
import { mkdirSync } from "node:fs";
import { join } from "node:path";

import { chromium } from "playwright-core";

const [base, experimentId, runId, outDir, model, modelVersion, ...aliasArgs] = process.argv.slice(2);
if (!base || !experimentId || !runId || !outDir || !model || modelVersion === undefined) {
  console.error("usage: check_ui.mjs <base-url> <experiment-id> <run-id> <out-dir> <model> <run-version> <alias>=<version>...");
  process.exit(2);
}
const aliases = aliasArgs.map((arg) => arg.split("="));
const executablePath = process.env.CHROMIUM ?? "/usr/bin/chromium";
const timeout = Number(process.env.UI_TIMEOUT_MS ?? 20000);
// The per-epoch history, logged as epoch/<name>: the UI groups charts by the prefix before "/" into a section
// ("epoch") and titles each chart with the rest; prefixed sections come before "Model metrics".
const metrics = ["train_loss", "test_loss", "test_accuracy"];
const digest = process.env.DATASET_DIGEST ?? "";
const loggedModelId = process.env.LOGGED_MODEL_ID ?? "";
const failures = [];
mkdirSync(outDir, { recursive: true });

// Wait until `locator` is visible; record a failure (with what the page did show) otherwise.
async function expectVisible(page, locator, what) {
  try {
    await locator.first().waitFor({ state: "visible", timeout });
    console.log(`ok: ${what}`);
  } catch {
    const shown = (await page.locator("body").innerText().catch(() => "")).replace(/\s+/g, " ").slice(0, 1000);
    failures.push(`${what}: not visible within ${timeout} ms at ${page.url()} (page text: ${shown})`);
  }
}

async function visit(page, hash, name, checks) {
  const url = `${base}/#${hash}`;
  console.log(`page: ${url}`);
  await page.goto(url, { waitUntil: "domcontentloaded", timeout });
  await checks();
  const file = join(outDir, `${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  console.log(`screenshot: ${file}`);
}

const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
try {
  // Tall enough that the run overview's metrics table and the three charts fit in one screenshot
  // (the UI scrolls inside its own panel, so a full-page screenshot is only the viewport).
  const page = await browser.newPage({ viewport: { width: 1400, height: 1500 } });
  const errors = [];
  page.on("pageerror", (error) => errors.push(String(error)));
  // Everything the UI asks for must come from the server under test: no outside requests.
  await page.route("**/*", (route) =>
    route.request().url().startsWith(base) || route.request().url().startsWith("data:")
      ? route.continue()
      : route.abort(),
  );

  const run = `/experiments/${experimentId}/runs/${runId}`;
  // Overview tab: the run's params and metrics tables list every logged param and metric by name.
  await visit(page, run, "run-overview", async () => {
    await expectVisible(page, page.getByText(/^Metrics \(\d+\)$/), "run overview shows its metrics table");
    await expectVisible(page, page.getByText(/^Parameters \(\d+\)$/), "run overview shows its params table");
    // The MLflow Assistant side panel opens by default; closing it only makes room (best effort).
    await page
      .locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
      .click({ timeout: 2000 })
      .catch(() => console.log("note: no MLflow Assistant panel to close"));
    for (const name of metrics) {
      await expectVisible(page, page.getByText(`epoch/${name}`, { exact: true }), `run overview shows metric epoch/${name}`);
    }
    await expectVisible(page, page.getByText("train.epochs", { exact: true }), "run overview shows param train.epochs");
  });
  // The same page for docs/tracking.md, with a frame around the params and the metrics tables.
  await visit(page, run, "run-page", async () => {
    await expectVisible(page, page.getByText(/^Parameters \(\d+\)$/), "run page shows its params table");
    await page
      .locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
      .click({ timeout: 2000 })
      .catch(() => {});
    const framed = await page.evaluate(() => {
      let count = 0;
      for (const heading of document.querySelectorAll("body *")) {
        const text = heading.childElementCount === 0 ? heading.textContent.trim() : "";
        if (!/^(Parameters|Metrics) \(\d+\)$/.test(text)) continue;
        // The table's box: the nearest ancestor that also holds the table's rows.
        let box = heading.parentElement;
        while (box && box.querySelectorAll('[role="row"], tr').length < 2) box = box.parentElement;
        if (!box) continue;
        box.style.outline = "4px solid #e8590c";
        box.style.outlineOffset = "-4px"; // inside the box: the page clips what lies outside it
        count += 1;
      }
      return count;
    });
    if (framed !== 2) failures.push(`run page: framed ${framed} tables, not the params and metrics tables`);
    if (modelVersion) {
      await expectVisible(page, page.getByText(`v${modelVersion}`, { exact: true }), `run overview shows ${model} v${modelVersion}`);
    }
  });
  // Inputs: the datasets the run trained and was tested on, each with its DVC digest. The overview
  // lists them by name; clicking one opens its details (digest, source, schema).
  if (digest) {
    await visit(page, run, "run-inputs", async () => {
      for (const name of ["mnist-train", "mnist-test"]) {
        await expectVisible(page, page.getByText(name).filter({ visible: true }), `run overview lists dataset ${name}`);
      }
      await page.getByText("mnist-test").filter({ visible: true }).first().click({ timeout }).catch(() => {});
      await expectVisible(page, page.getByText(digest.slice(0, 8)), `dataset details show digest ${digest}`);
    });
  }
  // System metrics tab: charts of CPU and memory sampled during training.
  await visit(page, `${run}/system-metrics`, "run-system-metrics", async () => {
    for (const name of ["system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"]) {
      const title = page.getByText(new RegExp(`^(system/)?${name.replace("system/", "")}$`));
      await expectVisible(page, title, `system-metrics tab shows chart ${name}`);
    }
    await expectVisible(page, page.locator("canvas, svg.main-svg, .js-plotly-plot"), "system-metrics tab draws charts");
  });
  // The logged model's page (MLflow 3): its metrics, measured on the test set.
  if (loggedModelId) {
    await visit(page, `/experiments/${experimentId}/models/${loggedModelId}`, "logged-model", async () => {
      await expectVisible(page, page.getByText("test_accuracy", { exact: true }), "logged model page lists test_accuracy");
      await expectVisible(page, page.getByText("mnist-test").filter({ visible: true }), "logged model metrics name the test set");
    });
  }
  // The experiment in the training view, as `make ui` opens it.
  await visit(page, `/experiments/${experimentId}?workflowType=machine_learning`, "runs-table", async () => {
    await expectVisible(page, page.getByText("Run Name").filter({ visible: true }), "training view shows the runs table");
    const shown = await page.getByText("test_accuracy").filter({ visible: true }).count();
    console.log(`note: test_accuracy column ${shown ? "shown" : "not shown"} by default`);
  });
  // Model metrics tab: the "epoch" section first, its charts drawn without any search: charts below the
  // fold are not rendered, so the per-epoch curves must be at the top of the page.
  await visit(page, `${run}/model-metrics`, "run-model-metrics", async () => {
    await expectVisible(page, page.getByPlaceholder("Search metric charts"), "model-metrics tab has its chart search box");
    // Section titles carry their chart count: "epoch (4)", "Model metrics (27)" (the tab is "Model metrics").
    const epoch = page.getByText(/^epoch\s*\(\d+\)$/).filter({ visible: true });
    const rest = page.getByText(/^Model metrics\s*\(\d+\)$/).filter({ visible: true });
    await expectVisible(page, epoch, "model-metrics tab has the epoch section");
    await expectVisible(page, rest, "model-metrics tab has the Model metrics section");
    const box = (locator) => locator.first().boundingBox({ timeout }).catch(() => null);
    const [top, below] = await Promise.all([box(epoch), box(rest)]);
    if (!(top && below && top.y < below.y)) failures.push(`the epoch section is not above Model metrics: ${JSON.stringify([top, below])}`);
    else console.log("ok: the epoch section comes first");
    // At most about 30 model metrics a run: the two sections' counts.
    const counts = await Promise.all([epoch, rest].map((l) => l.first().innerText({ timeout }).catch(() => "")));
    const [epochs, singles] = counts.map((text) => Number(text.match(/\((\d+)\)/)?.[1] ?? "0"));
    if (epochs !== 4 || !(singles > 0 && epochs + singles <= 31)) failures.push(`model metrics: ${counts.join(", ")}, not 4 per-epoch and at most 31 in all`);
    else console.log(`ok: ${epochs} per-epoch and ${singles} single-value model metrics`);
    for (const name of metrics) {
      await expectVisible(page, page.getByText(name, { exact: true }), `model-metrics tab shows chart ${name}`);
      // The legend ("<run name> (<metric>)") is drawn with the per-step line plot, not before.
      const legend = page.getByText(new RegExp(`\\((epoch/)?${name}\\)$`));
      await expectVisible(page, legend, `model-metrics tab draws ${name} over steps`);
    }
    await expectVisible(page, page.getByText("Step", { exact: true }), "model-metrics charts have a Step axis");
  });
  // Registered model: its name, and each alias ("@ alias" chip) on the row of the version it points at.
  await visit(page, `/models/${encodeURIComponent(model)}`, "registered-model", async () => {
    await expectVisible(page, page.getByText(model, { exact: true }), `model page shows ${model}`);
    for (const [alias, version] of aliases) {
      const link = page.getByRole("link", { name: `Version ${version}`, exact: true });
      const row = page.getByRole("row").filter({ has: link });
      const chip = row.getByText(new RegExp(`^@\\s*${alias}$`));
      await expectVisible(page, chip, `model page shows alias ${alias} on version ${version}`);
    }
  });
  if (errors.length) console.log(`page errors (not failures): ${errors.join(" | ")}`);
} finally {
  await browser.close();
}

if (failures.length) {
  for (const failure of failures) console.error(`FAIL: ${failure}`);
  process.exit(1);
}
console.log("all UI checks passed");
