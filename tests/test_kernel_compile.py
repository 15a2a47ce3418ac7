"""The Triton kernels compiled for a Hopper GPU (sm_90) on this machine, without one. The interpreter that the other
kernel tests use runs the Python source, not the compiler, so a kernel can pass them and still fail to compile on a
GPU, or compile to code that spills registers to memory. Triton's NVIDIA backend ships ptxas and cuobjdump, so both
can be checked here. The compile runs in a child process: this test session runs Triton in interpreter mode
(conftest.py), in which the kernels are not compilable objects."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resource_usage(dtype: str, aligned: bool) -> dict:
    """Compile each kernel at its shipped tiles for sm_90 with activations in ``dtype``; ``{kernel: {REG, STACK,
    ..., "vector_loads": n}}`` as cuobjdump reports them, with the count of 128-bit global loads in the machine
    code. ``aligned``: every pointer and integer argument divisible by 16, which Triton's launcher tells the compiler
    for such values (token counts and widths that are multiples of 16: the usual case); else nothing is known about
    them (odd shapes)."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from neuroada import triton_backend as tb

    o, n, warps = tb._FORWARD_TILES
    c, n_grad, warps_grad = tb._INPUT_GRAD_TILES
    o_delta, n_delta, warps_delta = tb._DELTA_GRAD_TILES
    kernels = {
        "forward": (tb._forward_kernel, {
            "x_t_ptr": f"*{dtype}", "columns_ptr": "*i32", "delta_ptr": "*fp32", "out_ptr": "*fp32", "tokens": "i32",
            "out_features": "i32", "k": "i32", "stride_x_t": "i32", "stride_out": "i32", "BLOCK_O": "constexpr",
            "BLOCK_N": "constexpr"}, {"BLOCK_O": o, "BLOCK_N": n}, warps),
        "input_grad": (tb._input_grad_kernel, {
            "grad_t_ptr": "*fp32", "rows_ptr": "*i32", "weights_ptr": "*fp32", "offsets_ptr": "*i32",
            "out_ptr": f"*{dtype}", "tokens": "i32", "in_features": "i32", "stride_g_t": "i32", "stride_out": "i32",
            "BLOCK_C": "constexpr", "BLOCK_N": "constexpr"}, {"BLOCK_C": c, "BLOCK_N": n_grad}, warps_grad),
        "delta_grad": (tb._delta_grad_kernel, {
            "x_t_ptr": f"*{dtype}", "grad_t_ptr": "*fp32", "columns_ptr": "*i32", "partial_ptr": "*fp32",
            "tokens": "i32", "out_features": "i32", "k": "i32", "stride_x_t": "i32", "stride_g_t": "i32",
            "tokens_per_split": "i32", "BLOCK_O": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}, {
            "BLOCK_O": o_delta, "BLOCK_N": n_delta, "BLOCK_K": tb._DELTA_GRAD_MAX_BLOCK_K}, warps_delta),
    }
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (kernel, signature, constexprs, num_warps) in kernels.items():
            arguments = [i for i, kind in enumerate(signature.values()) if kind != "constexpr"]
            attrs = {(i,): [["tt.divisibility", 16]] for i in arguments} if aligned else {}
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                                      target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
            path = os.path.join(folder, f"{name}.cubin")
            with open(path, "wb") as handle:
                handle.write(compiled.asm["cubin"])
            report = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True,
                                    check=True).stdout
            line = next(line for line in report.splitlines() if "REG:" in line)
            usage[name] = dict(field.split(":", 1) for field in line.split() if ":" in field)
            sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
            usage[name]["vector_loads"] = sass.count("LDG.E.128")
    return usage


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "odd"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_kernels_compile_for_sm90_without_spilling(dtype, aligned):
    triton = pytest.importorskip("triton", reason="Triton is not installed")
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("Triton's NVIDIA backend tools are not installed")
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "src"), os.path.join(ROOT, "tests")])
    done = subprocess.run([sys.executable, "-c", "import json, sys, test_kernel_compile as t; "
                           f"print(json.dumps(t.resource_usage({dtype!r}, {aligned})))"],
                          env=environment, capture_output=True, text=True, timeout=300)
    if done.returncode and "ASTSource" in done.stderr and "ImportError" in done.stderr:
        pytest.skip("this Triton has no ASTSource/GPUTarget API")
    assert done.returncode == 0, done.stderr[-3000:]
    usage = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(usage) == {"forward", "input_grad", "delta_grad"}
    for name, fields in usage.items():
        # a stack frame in these kernels is spilled registers: a round trip to memory for every element
        assert fields["STACK"] == "0", (name, dtype, fields)
        assert int(fields["REG"]) <= 128, (name, dtype, fields)
        if aligned:  # the gathered rows are read 16 bytes per thread and instruction, not element by element
            assert fields["vector_loads"] > 0, (name, dtype, fields)
