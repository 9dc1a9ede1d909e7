"""A job's output as the API returns it, against hand-made frames and actions."""

from __future__ import annotations

import numpy as np
import pytest

from cosmos3_serve.model_executor.request import GenerationRequest
from cosmos3_serve.server.jobs import Job, job_output


def test_actions_that_are_not_finite_fail_the_job_instead_of_its_json() -> None:
    job = Job(id="j", mode="policy", request=GenerationRequest("p", num_frames=1, height=32, width=32, seed=3))
    actions = np.array([[0.5, -1.0], [np.nan, 2.0]], dtype=np.float32)
    with pytest.raises(ValueError, match="not finite"):
        job_output(job, None, actions)
    output = job_output(job, None, np.nan_to_num(actions))
    assert output.actions == [[0.5, -1.0], [0.0, 2.0]] and output.seed == 3 and output.content is None
