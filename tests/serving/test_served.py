"""The registered model (src/mnist_cnn/serving/served.py): plain records for uint8 MNIST fields, one per
field, answered ({digit, probability, reason None}) or refused ({-1, 0, reason}), as the scoring
server writes them."""

from __future__ import annotations

import json

import numpy as np

from helpers import untrained_with_refusal
from mnist_cnn.core import refusal
from mnist_cnn.serving.served import ServedModel, answers


def test_records_for_uint8_fields_answered_and_refused() -> None:
    net, images, _, stats = untrained_with_refusal()
    fields = np.concatenate([images[:6], np.zeros((1, 28, 28), np.uint8)])
    fields.flags.writeable = False  # as the server hands over its parsed input

    records = answers(net, stats, fields)
    assert len(records) == 7
    assert json.loads(json.dumps(records)) == records  # plain values, written as they are
    blank = records[-1]
    assert blank == {"digit": -1, "probability": 0.0, "reason": refusal.BLANK}
    answered = [r for r in records[:-1] if r["reason"] is None]
    assert len(answered) >= 3, records  # training digits are mostly answered
    for record in records[:-1]:
        assert set(record) == {"digit", "probability", "reason"}
        if record["reason"] is None:
            assert record["digit"] in range(10) and 0.1 <= record["probability"] <= 1, record
        else:
            assert record["digit"] == -1 and record["probability"] == 0, record

    served = ServedModel()
    served.net, served.stats = net, stats
    assert served.predict(None, fields) == records  # type: ignore[arg-type]
