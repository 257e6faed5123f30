"""Property-based tests of careless and hostile input (hypothesis): generated configs for ``memguard check``
and generated arguments for the Python API. The invariants: the exit code is one of the documented ones,
no traceback reaches the user, nothing is printed to stdout after an error (so no verdict contradicts the
exit code), and no class memguard must not build is ever built. A bounded number of examples keeps CI fast;
benchmarks/fuzz_inputs.py runs many more and records the outcomes."""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hostile_configs import MARKER, write  # noqa: E402
from memguard import MemguardError, estimate  # noqa: E402
from memguard.act.callback import MemGuard  # noqa: E402
from memguard.cli import main  # noqa: E402

EXIT_CODES = {0, 1, 2, 3}
SETTINGS = settings(max_examples=15, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@SETTINGS
@given(seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_generated_configs_keep_the_exit_code_contract(tmp_path_factory, seed: int) -> None:
    folder = tmp_path_factory.mktemp("config")
    path = write(seed, folder)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["check", str(path), "--gpu", "A100-80GB"])
    assert code in EXIT_CODES
    assert "Traceback" not in err.getvalue() and "--debug for the traceback" not in err.getvalue(), err.getvalue()
    if code == 2:
        assert out.getvalue() == "" and err.getvalue().startswith("memguard: error:")
    else:
        assert f"Exit code {code}:" in out.getvalue()
    assert not (folder / MARKER).exists()


ANYTHING = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                     st.text(max_size=12), st.lists(st.text(max_size=6), max_size=3))


@SETTINGS
@given(margin=ANYTHING, allow=ANYTHING, budget=ANYTHING, policy=ANYTHING)
def test_memguard_arguments_are_accepted_or_named(margin, allow, budget, policy) -> None:
    try:
        callback = MemGuard(margin=margin, allow=allow, budget=budget, policy=policy)
    except MemguardError as exc:
        assert str(exc)
        return
    assert 0 <= callback.margin < 1 and math.isfinite(callback.margin)
    assert callback.allow is None or all(isinstance(k, str) for k in callback.allow)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(precision=ANYTHING, device=ANYTHING, optimizer=ANYTHING, steps=ANYTHING)
def test_estimate_arguments_are_accepted_or_named(precision, device, optimizer, steps) -> None:
    model = torch.nn.Linear(4, 2)
    try:
        est = estimate(model, torch.randn(2, 4), precision=precision, device=device, optimizer=optimizer,
                       steps=steps)
    except MemguardError as exc:
        assert str(exc)
        return
    assert est.peak_bytes > 0
