"""docs/extending.md's example method, registered from outside the package, distils end to end
and reports its terms; the trainer derives what it needs from its registration alone."""

import os
import re

import numpy as np
import pytest

from jaxkd import distill, train
from jaxkd.metric_writer import read_metrics

from helpers import random_teacher, tiny_config

DOC = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "extending.md")


@pytest.fixture(scope="module")
def example_method():
    with open(DOC) as f:
        code = re.search(r"```python\n(.*?)```", f.read(), re.S).group(1)
    if "logit_mse" not in distill.list_methods():
        exec(compile(code, DOC, "exec"), {"__name__": "extending_example"})
    return "logit_mse"


def test_example_method_config_fields_and_errors(example_method):
    config = distill.method_config(example_method, mse_weight=0.5)
    assert dict(config) == {"name": "logit_mse", "mse_weight": 0.5}
    with pytest.raises(Exception, match="no config field.*num_teacher_classes"):
        distill.method_config(example_method, num_teacher_classes=3)  # derived, not config


def test_example_method_distills_end_to_end(tmp_path, example_method):
    teacher = random_teacher(str(tmp_path / "teacher"), num_classes=10)
    config = tiny_config(example_method, data_dir=str(tmp_path / "tfds"),
                         teacher_checkpoint=teacher, steps=2, mse_weight=0.5)
    result = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert 0.0 <= result["eval/top1"] <= 100.0
    steps = [m for m in read_metrics(str(tmp_path / "run")) if "train/loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        np.testing.assert_allclose(m["train/loss"], m["train/ce"] + 0.5 * m["train/mse"],
                                   rtol=1e-5)
