"""The vLLM plugin's touch-point tables and the check made when it registers (no vLLM needed:
the check runs against stand-in classes; tests/test_vllm.py runs the real thing)."""
from __future__ import annotations

import sys
import types

import pytest

from steerkernel.integrations.vllm import norm, patches, touchpoints
from steerkernel.integrations.vllm.touchpoints import (TOUCH_POINTS, TouchPoint, find_owner,
                                                       missing_message, table_version)


def test_every_touch_point_is_documented_and_has_a_wrapper():
    assert "0.32" in TOUCH_POINTS
    for key, table in TOUCH_POINTS.items():
        kinds = [tp.kind for tp in table]
        assert len(kinds) == len(set(kinds)), key
        for tp in table:
            assert tp.kind in patches.WRAPPERS, tp.kind
            assert tp.module.startswith("vllm.") and tp.attr, tp
            # a module-level function has no class: its target is module.function
            assert tp.target == ".".join(x for x in (tp.module, tp.cls, tp.attr) if x), tp
            assert tp.patches.strip() and tp.why.strip() and tp.replacement.strip(), tp
    # the internals of docs/vllm.md: input processing, async and HTTP admission, worker load,
    # execute, the V1 / V2 batch layouts, stop on alarm, and the readings path
    assert {tp.kind for tp in TOUCH_POINTS["0.32"]} == {
        "input_processing", "async_admission", "worker_load", "execute_v1", "batch_layout_v1",
        "execute_v2", "batch_layout_v2", "sample_stops", "scheduler_output", "scheduler_stop",
        "readings_channel", "response_middleware", "completions_admission", "chat_admission"}
    mw = next(tp for tp in TOUCH_POINTS["0.32"] if tp.kind == "response_middleware")
    assert mw.cls == "" and mw.target == \
        "vllm.entrypoints.launchers.app.init_entrypoints_middleware"


def test_table_for_a_version():
    assert table_version("0.32.0") == ("0.32", True)
    assert table_version("0.32.0+cpu") == ("0.32", True)
    assert table_version("0.99.1") == ("0.32", False)
    assert table_version("unknown") == ("0.32", False)


def test_find_owner_says_what_is_missing():
    ok = TouchPoint("x", "collections", "OrderedDict", "popitem", "p", "w", "r")
    import collections

    assert find_owner(ok) is collections.OrderedDict
    for tp, said in ((TouchPoint("x", "collections", "OrderedDict", "nope", "p", "w", "r"),
                      "collections.OrderedDict.nope does not exist"),
                     (TouchPoint("x", "collections", "Nope", "f", "p", "w", "r"),
                      "collections.Nope does not exist"),
                     (TouchPoint("x", "no_such_module_xyz", "C", "f", "p", "w", "r"),
                      "no_such_module_xyz cannot be imported")):
        with pytest.raises(LookupError, match=said):
            find_owner(tp)
    assert missing_message("1.2.3", "0.32", []) is None
    msg = missing_message("1.2.3", "0.32", [(ok, "gone")])
    assert "vLLM 1.2.3" in msg and "x (collections.OrderedDict.popitem): gone" in msg


@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in 'vLLM' module with a runner class, a fresh plugin state, and a table that
    names one present, one missing and one optional, absent touch point."""
    mod = types.ModuleType("fake_vllm_internals")

    class Runner:
        def execute_model(self, scheduler_output):
            return ("ran", scheduler_output)

    mod.Runner = Runner
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    table = (
        TouchPoint("execute_v1", mod.__name__, "Runner", "execute_model", "p", "w", "r"),
        TouchPoint("batch_layout_v1", mod.__name__, "Runner", "_prepare_inputs", "p", "w", "r"),
        TouchPoint("batch_layout_v2", mod.__name__, "V2Runner", "prepare_inputs", "p", "w",
                   "r", optional=True),
    )
    monkeypatch.setattr(touchpoints, "TOUCH_POINTS", {"9.9": table})
    monkeypatch.setattr(touchpoints, "installed_vllm_version", lambda: "9.9.1")
    monkeypatch.setattr(patches, "_INSTALLED", {})
    monkeypatch.setattr(patches, "MISSING", [])
    monkeypatch.setattr(patches, "MISSING_MESSAGE", None)
    monkeypatch.setattr(norm, "register_norm", lambda: True)
    return Runner


def test_install_checks_the_table_and_a_config_is_refused_with_the_reason(fake_vllm):
    patches.install()
    # the present touch point is wrapped, and without a steerkernel state it passes through
    assert getattr(fake_vllm.execute_model, "_steerkernel_wrapped", False)
    assert fake_vllm().execute_model("so") == ("ran", "so")
    # the missing one is named with the vLLM version; the optional one is not a problem
    assert patches.MISSING == ["fake_vllm_internals.Runner._prepare_inputs"]
    msg = patches.MISSING_MESSAGE
    assert "vLLM 9.9.1" in msg and "batch_layout_v1" in msg and "V2Runner" not in msg
    patches.install()  # idempotent: wrapped once
    assert fake_vllm.execute_model._steerkernel_original.__name__ == "execute_model"
    assert not getattr(fake_vllm.execute_model._steerkernel_original, "_steerkernel_wrapped",
                       False)
    # an engine without a steerkernel config is untouched; one with a config is refused
    patches._setup_worker(types.SimpleNamespace(vllm_config=types.SimpleNamespace(
        additional_config={})))
    worker = types.SimpleNamespace(vllm_config=types.SimpleNamespace(
        additional_config={"steerkernel": {"bank": "/nonexistent.safetensors"}}))
    with pytest.raises(RuntimeError, match=r"vLLM 9\.9\.1 lacks .*batch_layout_v1"):
        patches._setup_worker(worker)
