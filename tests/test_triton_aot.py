"""Every Triton kernel, in every mode and autotuning configuration, compiled for real GPUs
(A100's sm_80 and H100/H200's sm_90) without one, through Triton's bundled ptxas.

Oracles: the PTX of each product kernel holds the tensor-core MMA of its type (int8 x int8 ->
int32 at 8 bits, fp16 x fp16 -> fp32 at 9-16 bits; a product that fell back to scalar FMAs or
to TF32 fails), Hopper gets its warpgroup MMA (``wgmma``) from at least one configuration, and
for every kernel and mode at least one configuration fits the architecture's shared memory
without spilling registers. The compilation runs in a subprocess: the suite itself runs Triton
in its interpreter, which has no compiler behind it.
"""
import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest
import torch

triton = pytest.importorskip("triton")
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
pytestmark = [pytest.mark.skipif(not os.path.exists(PTXAS), reason="this Triton build carries no ptxas"),
              pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU compiles and runs the kernels for real")]


@pytest.fixture(scope="module")
def all_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out.parent / "cache")
    proc = subprocess.run([sys.executable, "-m", "muppet_fx.kernels.triton_aot", "--arch", "sm_80", "sm_90",
                           "--ones", "sm_90", "--json", str(out)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def rows(all_rows):
    """The launchers' own variants (without the ones-sweep of ``unit_variants``)."""
    return [r for r in all_rows if " = 1" not in r["mode"]]


def _groups(rows):
    g = defaultdict(list)
    for r in rows:
        g[(r["arch"], r["kernel"], r["mode"])].append(r)
    return g


def test_every_variant_compiles(all_rows, rows):
    """Every variant, and every kernel with any one specialised integer argument equal to 1 (a
    2-bit qmax of 1 once failed only on a GPU, where Triton made it a constant)."""
    bad = [(r["arch"], r["kernel"], r["mode"], r["config"], r["error"]) for r in all_rows if not r["ok"]]
    assert not bad
    assert sum(" = 1" in r["mode"] for r in all_rows) >= 100
    assert {r["kernel"] for r in rows} == {"scaled_mm", "conv", "conv_grad_weight", "sum_scale", "absmax", "quantise",
                                           "scale", "bn_sums", "bn_stats", "bn_apply", "bn_grad_sums", "bn_factors",
                                           "bn_grad_apply", "relu_mask", "relu_mask_backward", "many_absmax",
                                           "many_quantise"}
    per_arch = defaultdict(set)
    for r in rows:
        per_arch[r["arch"]].add((r["kernel"], r["mode"], r["config"]))
    assert per_arch["sm_80"] == per_arch["sm_90"] and len(per_arch["sm_80"]) >= 45  # autotuning configs


def test_products_use_tensor_cores_of_their_type(rows):
    for r in rows:
        if r["kernel"] in ("scaled_mm", "conv", "conv_grad_weight"):
            want = ".s32.s8.s8" if r["mode"].startswith("int8") else ".f32.f16.f16"
            assert any(want in x for x in r["mma"]), (r["arch"], r["kernel"], r["mode"], r["config"], r["mma"])


def test_hopper_gets_warpgroup_mma(rows):
    for (arch, kernel, mode), group in _groups(rows).items():
        if arch == "sm_90" and kernel in ("scaled_mm", "conv", "conv_grad_weight"):
            assert any(x.startswith("wgmma") for r in group for x in r["mma"]), (kernel, mode)


def test_each_mode_has_a_configuration_that_fits_without_spills(rows):
    for key, group in _groups(rows).items():
        assert any(r["fits"] and r["spill_bytes"] == 0 for r in group), (key, [
            (r["config"], r["shared"], r["spill_bytes"]) for r in group])


def test_product_loads_are_pipelined_except_the_int8_weight_gradient_on_wgmma(rows):
    """Every product kernel's operand loads are asynchronous copies (what the software pipeliner
    overlaps with the MMAs) in every configuration, save one known case: the int8 weight
    gradient on Hopper's warpgroup MMA, whose 8-bit operands must be K-major in shared memory
    while channels-last ones are not, so they go through registers. The same gradient on FP16
    MMA (``conv_triton.GRAD_WEIGHT_MMA = "fp16"``) pipelines."""
    for r in rows:
        if r["kernel"] not in ("scaled_mm", "conv", "conv_grad_weight"):
            continue
        on_wgmma = any(x.startswith("wgmma") for x in r["mma"])
        if r["kernel"] == "conv_grad_weight" and r["mode"] == "int8" and on_wgmma:
            assert r["async_copies"] == 0, (r["arch"], r["config"])
        else:
            assert r["async_copies"] > 0, (r["arch"], r["kernel"], r["mode"], r["config"])
