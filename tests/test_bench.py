"""``mdtzoo bench``: analytic FLOP counts against the DiT paper, and the command on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

from mdtzoo.bench import (bench_train_step, expected_kept_tokens, format_result, forward_macs, markdown_table,
                          train_step_flops)
from mdtzoo.launch.cli import main
from mdtzoo.models import build_model

# DiT paper (SPEC section 6 / Table 4): forward "Gflops" = fvcore multiply-adds per image at 256^2.
DIT_GMACS = {"dit_s2": 6.06, "dit_b2": 23.01, "dit_l2": 80.71, "dit_xl2": 118.64}


def meta_model(name: str):
    with torch.device("meta"):
        return build_model(name)


@pytest.mark.parametrize("name", sorted(DIT_GMACS))
def test_dit_forward_macs_match_the_paper(name):
    model = meta_model(name)
    got = forward_macs(model) / 1e9
    assert got == pytest.approx(DIT_GMACS[name], rel=0.01)
    # A DiT step is the full pass only: 2 FLOPs per MAC, x3 for forward + backward.
    assert train_step_flops(model, 64) == pytest.approx(64 * 6 * forward_macs(model))
    assert train_step_flops(model, 64, "full") == train_step_flops(model, 64, "auto")


def test_dit_xl2_tflops_anchor():
    # SPEC section 6: compiled reference DiT-XL/2 at 529 img/s is about 379 TFLOP/s.
    per_image = train_step_flops(meta_model("dit_xl2"), 1)
    assert 529 * per_image / 1e12 == pytest.approx(379, rel=0.01)


def test_mdt_step_flops():
    mdt, dit = meta_model("mdt_xl2"), meta_model("dit_xl2")
    assert expected_kept_tokens(mdt) == int(256 * 0.7) == 179
    # The full pass of MDT-XL/2 is DiT-XL/2's (the side block is used in the masked pass only).
    assert forward_macs(mdt) == forward_macs(dit)
    masked = forward_macs(mdt, masked=True)
    # Encoder on 179 tokens, interpolator + decoder on 256: between 70% and 80% of a full pass.
    assert 0.7 * forward_macs(mdt) < masked < 0.8 * forward_macs(mdt)
    ratio = train_step_flops(mdt, 8) / train_step_flops(dit, 8)
    assert 1.74 <= ratio <= 1.8  # SPEC section 6: an MDT step is about 1.75-1.8x a DiT step
    assert train_step_flops(mdt, 8, "both") == pytest.approx(
        train_step_flops(mdt, 8, "full") + train_step_flops(mdt, 8, "masked"))
    assert forward_macs(mdt, masked=True, kept=256) > forward_macs(mdt)  # + the side block
    with pytest.raises(ValueError):
        train_step_flops(dit, 8, "both")


def test_mdtv2_counts_skip_linears_and_jitter():
    v2, v1 = meta_model("mdtv2_xl2"), meta_model("mdt_xl2")
    # Long skips (12 pairs) and dense skips (4 decoder blocks) add a 2D x D linear per token each.
    d, n = 1152, 256
    assert forward_macs(v2) - forward_macs(v1) == pytest.approx((12 + 4) * n * 2 * d * d, rel=1e-9)
    # Ratio U[0.3, 0.5): mean kept count near 256 * 0.6.
    assert 145 < expected_kept_tokens(v2) < 165


def _cli_step(tmp_path, *args: str) -> dict:
    """``mdtzoo bench train-step`` of one MDT-XS/2 step (batch 2) on the CPU with ``args``; its JSON result."""
    out = tmp_path / "r.json"
    assert main(["bench", "train-step", "--model", "mdt_xs2", "--batch", "2", "--steps", "1", "--warmup", "0",
                 "--device", "cpu", *args, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_bench_train_step_refuses_counts_out_of_range_before_building_anything():
    for kwargs in (dict(batch=0), dict(steps=0), dict(warmup=-1), dict(windows=-1)):
        args = dict(batch=2) | kwargs
        with pytest.raises(ValueError, match="need batch >= 1, steps >= 1, warmup >= 0, windows >= 0; got"):
            bench_train_step("mdt_xs2", args.pop("batch"), device="cpu", **args)


def test_bench_train_step_command_on_cpu(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["bench", "train-step", "--model", "mdt_xs2", "--batch", "4", "--steps", "2", "--warmup", "1",
               "--device", "cpu", "--windows", "3", "--json", str(out)])
    assert rc == 0
    assert "img/s" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["status"] == "ok" and r["model"] == "mdt_xs2" and r["passes"] == "both"
    assert r["precision"] == "fp32" and r["batch"] == 4 and r["steps"] == 2
    assert r["norm_impl"] == "triton" and r["mlp_impl"] == "torch"  # the defaults, recorded with the result
    assert r["kernel_ops"] == "triton"
    # three windows of two steps back to back, after the step-by-step timing; their median per step
    assert len(r["window_steps_ms"]) == 3 and all(t > 0 for t in r["window_steps_ms"])
    assert r["window_step_ms"] == pytest.approx(sorted(r["window_steps_ms"])[1])
    assert r["window_img_per_s"] == pytest.approx(4 / (r["window_step_ms"] / 1e3))
    assert "back to back:" in format_result(r) and "(median of 3 windows of 2)" in format_result(r)
    if r["kernel_ops"] is not None:  # the kernels' launch settings too, the norm's resolved at the model's width
        from mdtzoo.models import triton_attention, triton_mlp, triton_norm

        width = build_model("mdt_xs2").hidden_size
        assert r["kernel_settings"] == {"attention": triton_attention.CONFIG, "norm": triton_norm.launch_settings(width),
                                        "mlp": triton_mlp.CONFIG}
        assert None not in r["kernel_settings"]["norm"].values()
    assert r["img_per_s"] > 0 and r["step_ms"] > 0 and r["tflops"] > 0
    assert r["flops_per_step"] == pytest.approx(train_step_flops(build_model("mdt_xs2"), 4))
    assert r["peak_fraction"] == pytest.approx(r["tflops"] / 790.0)
    assert "| mdt_xs2 | 4 |" in markdown_table([r])
    # the compile cell names a mode or scope that is not the default, so such rows tell apart
    cells = [markdown_table([r | change]).splitlines()[-1].split(" | ")[4] for change in (
        {"compile": True}, {"compile": "default", "compile_scope": "stacks"}, {"compile": "reduce-overhead"},
        {"compile": True, "graph_step": True})]
    assert cells == ["yes", "stacks", "reduce-overhead", "yes, graph step"]
    # a captured step's memory is what was reserved (its graphs' pool), and says so
    reserved = r | {"graph_step": True, "peak_mem_gib": 33.25, "peak_mem_kind": "reserved"}
    assert markdown_table([reserved]).splitlines()[-1].split(" | ")[10] == "33.2 reserved"
    assert "peak memory 33.2 GiB reserved (the graphs' pool included)" in format_result(reserved)
    assert main(["bench", "table", str(out)]) == 0
    assert "| mdt_xs2 | 4 | 1 | fp32 | no | both |" in capsys.readouterr().out


def test_bench_full_pass_and_bad_input(tmp_path, capsys):
    r = _cli_step(tmp_path, "--passes", "full", "--profile")
    assert "Self CPU" in capsys.readouterr().out  # the profile of two more steps, printed, not in the JSON
    assert r["passes"] == "full" and "profile" not in r and r["compile_scope"] == "blocks"
    with pytest.raises(ValueError, match="unknown compile scope 'model'; valid: blocks, stacks"):
        bench_train_step("mdt_xs2", 2, device="cpu", compile_scope="model")
    # A DiT preset has no masked pass: a one-line error, exit code 2.
    assert main(["bench", "train-step", "--model", "dit_s2", "--batch", "2", "--passes", "both",
                 "--device", "cpu"]) == 2
    assert "masked pass" in capsys.readouterr().err


def test_bench_attention_names_unknown_paths_and_bad_shapes_before_any_work():
    from mdtzoo.bench import bench_attention

    with pytest.raises(ValueError, match=r"unknown attention path\(s\) 'flex:nope'; valid: auto, .*flex:g16.*triton:b32"):
        bench_attention(("flex", "flex:nope"))
    with pytest.raises(ValueError, match="keep must be in 1..16 .*got 17"):
        bench_attention(("explicit",), grid=4, keep=17)


def test_bench_sample_on_cpu_checks_profiles_and_refuses_bad_modes(tmp_path, capsys):
    from mdtzoo.bench import bench_sample, sample_flops

    out = tmp_path / "s.json"
    rc = main(["bench", "sample", "--model", "mdt_xs2", "--batch", "2", "--steps", "2", "--repeats", "1",
               "--check", "2", "--precision", "fp32", "--device", "cpu", "--profile", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "img/s" in printed and "Self CPU" in printed  # the profile table comes before the summary
    r = json.loads(out.read_text())
    assert "profile" not in r and r["compile"] is False and r["steps"] == 2 and r["batch"] == 2
    # Same seed, same fp32 maths: the fast path (auto attention) and the explicit reference agree.
    assert r["check_images"] == 2 and r["check_rel_diff"] < 1e-5
    assert r["flops_per_image"] == pytest.approx(sample_flops(build_model("mdt_xs2"), 2, guided=True))
    assert r["img_per_s"] == pytest.approx(2 / r["seconds"])
    with pytest.raises(ValueError, match="torch.compile mode .*reduce-overhead.*got 'fast'"):
        bench_sample("mdt_xs2", 2, compile="fast", device="cpu")


def test_the_sample_check_reference_runs_every_block_on_the_reference_maths_then_restores():
    from mdtzoo.bench import unoptimised

    model = build_model("mdt_xs2", attn_impl="flex", norm_impl="triton")
    blocks = list(model.all_blocks())
    with unoptimised(model):
        assert {(b.attn.impl, b.norm_impl) for b in blocks} == {("explicit", "torch")}
    assert {(b.attn.impl, b.norm_impl) for b in blocks} == {("flex", "triton")}
    with pytest.raises(RuntimeError), unoptimised(model):  # restored on errors too
        raise RuntimeError
    assert {(b.attn.impl, b.norm_impl) for b in blocks} == {("flex", "triton")}


def test_flex_variants_apply_inside_and_restore_and_unknown_ones_are_named(tmp_path, capsys):
    from mdtzoo.bench import FLEX_VARIANTS, bench_sample, bench_train_step, flex_variant
    from mdtzoo.models import attention as attn_mod

    before = dict(attn_mod.FLEX_KERNEL_OPTIONS)
    with flex_variant("m128n64"):
        assert attn_mod.FLEX_KERNEL_OPTIONS == FLEX_VARIANTS["m128n64"]
    assert attn_mod.FLEX_KERNEL_OPTIONS == before
    with pytest.raises(ValueError, match="unknown FlexAttention variant 'm9'; valid: m64n64s1, m128n64"):
        bench_train_step("mdt_xs2", 2, device="cpu", flex_options="m9")
    with pytest.raises(ValueError, match="unknown FlexAttention variant 'm9'"):
        bench_sample("mdt_xs2", 2, device="cpu", flex_options="m9")
    assert attn_mod.FLEX_KERNEL_OPTIONS == before
    assert _cli_step(tmp_path, "--flex-options", "m128n64")["flex_options"] == "m128n64"
    assert attn_mod.FLEX_KERNEL_OPTIONS == before


def test_triton_variants_apply_inside_and_restore_and_unknown_ones_are_named(tmp_path):
    pytest.importorskip("triton")
    from mdtzoo.bench import TRITON_VARIANTS, bench_sample, bench_train_step, triton_variant
    from mdtzoo.models import triton_attention

    before = dict(triton_attention.CONFIG)
    with triton_variant("pad"):
        assert triton_attention.CONFIG == before | TRITON_VARIANTS["pad"]
        assert triton_attention.CONFIG != before  # the variant changes something
    with triton_variant(None):
        assert triton_attention.CONFIG == before
    assert triton_attention.CONFIG == before
    with pytest.raises(ValueError, match="unknown Triton variant 'x1'; valid: 64x64, f128"):
        bench_train_step("mdt_xs2", 2, device="cpu", triton_options="x1")
    with pytest.raises(ValueError, match="unknown Triton variant 'x1'"):
        bench_sample("mdt_xs2", 2, device="cpu", triton_options="x1")
    assert _cli_step(tmp_path, "--passes", "full", "--triton-options", "pad")["triton_options"] == "pad"
    assert triton_attention.CONFIG == before
    # key=value settings (what experiments/bench/attn_sweep.py prints), validated the same way
    with triton_variant("fwd_bn=128, bwd_stages=3,split_head=false"):
        assert triton_attention.CONFIG == before | {"fwd_bn": 128, "bwd_stages": 3, "split_head": False}
    assert triton_attention.CONFIG == before
    for bad, why in (("fwd_bx=2", "unknown Triton setting 'fwd_bx'.*valid: fwd_bm, fwd_bn"),
                     ("fwd_bn=0", "fwd_bn takes a positive integer, not '0'"),
                     ("split_head=1", "split_head takes true or false"),
                     ("fwd_bn=48", "fwd_bn is a tile side or a warp count: it takes a power of two, not 48"),
                     ("norm.bwd_rows=3", "norm.bwd_rows .*power of two, not 3")):
        with pytest.raises(ValueError, match=why):
            bench_train_step("mdt_xs2", 2, device="cpu", triton_options=bad)
    assert triton_attention.CONFIG == before
    # the fused norm's settings prefixed norm. (what experiments/bench/norm_sweep.py prints), both at once
    from mdtzoo.models import triton_norm

    norm_before = dict(triton_norm.CONFIG)
    with triton_variant("norm.bwd_rows=1,norm.bwd_warps=16,fwd_warps=2"):
        assert triton_norm.CONFIG == norm_before | {"bwd_rows": 1, "bwd_warps": 16}
        assert triton_attention.CONFIG == before | {"fwd_warps": 2}  # the unprefixed key is the attention's
    assert (triton_norm.CONFIG, triton_attention.CONFIG) == (norm_before, before)
    with pytest.raises(ValueError, match="unknown Triton setting 'norm.fwd_bm'.*valid: .*norm.fwd_rows"):
        bench_train_step("mdt_xs2", 2, device="cpu", triton_options="norm.bwd_rows=1,norm.fwd_bm=2")
    assert triton_norm.CONFIG == norm_before
    # what a step ran with is recorded: the overrides, checked and timed under the same settings
    settings = _cli_step(tmp_path, "--passes", "full", "--triton-options", "norm.bwd_rows=2,fwd_bn=32")["kernel_settings"]
    assert settings["norm"]["bwd_rows"] == 2 and settings["attention"] == before | {"fwd_bn": 32}
    assert (triton_norm.CONFIG, triton_attention.CONFIG) == (norm_before, before)


def test_inductor_variants_patch_the_config_inside_only_and_unknown_ones_are_named(tmp_path):
    import torch._inductor.config as inductor_config

    from mdtzoo.bench import INDUCTOR_VARIANTS, bench_train_step, inductor_variant

    before = (inductor_config.coordinate_descent_tuning, inductor_config.aggressive_fusion)
    with inductor_variant("cdt_agg"):
        assert inductor_config.coordinate_descent_tuning is True and inductor_config.aggressive_fusion is True
    assert (inductor_config.coordinate_descent_tuning, inductor_config.aggressive_fusion) == before
    assert set(INDUCTOR_VARIANTS["cdt_agg"]) == set(INDUCTOR_VARIANTS["cdt"]) | set(INDUCTOR_VARIANTS["agg"])
    with pytest.raises(ValueError, match="unknown inductor variant 'fast'; valid: cdt, agg, cdt_agg, cpp, rows2048"):
        bench_train_step("dit_s2", 2, device="cpu", inductor_options="fast")
    with pytest.raises(ValueError, match="unknown update mode 'fast'; valid: auto, fused, op_by_op"):
        bench_train_step("dit_s2", 2, device="cpu", update="fast")
    assert _cli_step(tmp_path, "--passes", "full", "--inductor-options", "cdt")["inductor_options"] == "cdt"
    assert inductor_config.coordinate_descent_tuning == before[0]


def test_check_attention_passes_the_cpu_path_and_fails_a_wrong_one(monkeypatch):
    """bench attention's check (packed q, k, v as the model passes them, gradients included) holds
    the CPU's fused maths to 1e-5 in float32, and refuses a path that loses the bias."""
    from mdtzoo.bench import check_attention
    from mdtzoo.models import attention as attn

    shapes = dict(batch=2, heads=2, grid=4, keep=11, dim=8, device="cpu", compile=False)
    errors = check_attention("auto", **shapes)
    assert set(errors) == {"full_float32", "full_bfloat16", "masked_float32", "masked_bfloat16"}
    assert errors["full_float32"] < 1e-5 and errors["masked_float32"] < 1e-5
    monkeypatch.setattr(attn, "_fused_explicit", lambda q, k, v, bias: attn.explicit_attention(q, k, v))
    with pytest.raises(AssertionError, match="attention impl 'auto' full_float32 out: relative error"):
        check_attention("auto", **shapes)


def test_rows2048_keeps_inner_reductions_up_to_2048_in_registers_inside_only(monkeypatch):
    """The variant's choices handler: persistent for inner reductions up to 2048 elements (MDT-XL's
    1152-wide LayerNorms), inductor's own choice otherwise; restored on exit."""
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    from mdtzoo.bench import inductor_variant

    monkeypatch.setattr(InductorChoices, "should_use_persistent_reduction",
                        staticmethod(lambda features, cooperative: features.reduction_numel <= 1024))

    class Features:
        def __init__(self, numel, hint=ReductionHint.INNER):
            self.reduction_numel, self.hint = numel, hint

        def get_reduction_hint(self):
            return self.hint

    class Graph:
        class sizevars:  # noqa: N801 - stands for V.graph.sizevars
            statically_known_leq = staticmethod(lambda a, b: a <= b)

    before = type(V.choices)
    with inductor_variant("rows2048"), V.set_graph_handler(Graph()):
        choose = V.choices.should_use_persistent_reduction
        assert choose(Features(1152), False) and choose(Features(2048), False)
        assert choose(Features(512, ReductionHint.OUTER), False)  # inductor's own yes stands
        assert not choose(Features(2049), False)
        assert not choose(Features(1152, ReductionHint.OUTER), False)
        assert not choose(Features(1152), True)  # cooperative reductions left alone
    assert type(V.choices) is before


def test_published_performance_table_matches_its_json_results():
    """docs/performance.md's column (w) is the committed bench JSON, rounded as printed."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "performance.md").read_text()
    names = {"dit_s2": "DiT-S/2", "dit_xl2": "DiT-XL/2", "mdt_s2": "MDT-S/2", "mdt_b2": "MDT-B/2", "mdt_xl2": "MDT-XL/2"}
    results = sorted((root / "docs" / "results" / "bench").glob("step_*.json"))
    assert len(results) == len(names)
    for path in results:
        r = json.loads(path.read_text())
        assert r["status"] == "ok" and r["card"].startswith("NVIDIA H100") and r["precision"] == "bf16"
        assert f"| {names[r['model']]} | {r['batch']} | **{r['img_per_s']:,.0f}** |" in doc
    sample = json.loads((root / "docs" / "results" / "bench" / "sample_mdt_xl2.json").read_text())
    assert sample["steps"] == 250 and sample["check_rel_diff"] < 1e-3
    assert f"| 256 | **{sample['img_per_s']:.2f}** |" in doc and sample["img_per_s"] >= 3.0


def test_every_kernel_of_ours_is_counted_under_its_own_kind():
    """Each Triton kernel in our modules lands in its module's kind by name: a kernel named like another
    module's (the norm kernels were '_fwd_kernel' and '_bwd_kernel', as the attention's, until session
    13) would be counted under the wrong kind in every profile."""
    pytest.importorskip("triton")
    from triton.runtime.jit import JITFunction

    from mdtzoo.bench import kernel_class
    from mdtzoo.models import triton_attention, triton_mlp, triton_norm
    from mdtzoo.posenc import triton_offsets
    from mdtzoo.training import fused_update

    kinds = {triton_attention: "attention", triton_offsets: "attention",  # (the bias table's gradient)
             triton_norm: "LayerNorm + modulate (ours)", triton_mlp: "matmul", fused_update: "optimizer, EMA, grad norm"}
    for module, kind in kinds.items():
        launched = [name for name, obj in vars(module).items() if isinstance(obj, JITFunction)
                    and name.endswith("_kernel")]  # launched kernels; the rest are @triton.jit helpers
        assert launched, module.__name__
        for name in launched:
            assert kernel_class(name) == kind, (module.__name__, name, kernel_class(name))


def test_kernel_breakdown_sorts_kernels_by_kind_per_step():
    from mdtzoo.bench import kernel_breakdown, kernel_class

    assert kernel_class("triton_tem_fused_flex_attention_backward_transpose_view_10") == "attention"
    assert kernel_class("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<...>>") == "attention"
    assert all(kernel_class(k) == "attention" for k in ("_fwd_kernel", "_bwd_kernel", "_dq_kernel", "_delta_kernel",
                                                         "_kept_grad_kernel"))  # ours
    assert kernel_class("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN") == "matmul"
    assert kernel_class("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>") \
        == "optimizer, EMA, grad norm"
    assert kernel_class("triton_poi_fused__to_copy_gelu_view_4") == "compiled elementwise"
    assert kernel_class("void at::native::elementwise_kernel<128, 2, direct_copy_kernel_cuda>") == "copies, casts"
    assert kernel_class("void at::native::reduce_kernel<512, 1, ReduceOp<float, MeanOps>>") == "eager elementwise"
    assert kernel_class("some_custom_kernel") == "other"
    kernels = [("nvjet_a", 3000.0), ("nvjet_b", 1000.0), ("triton_poi_fused_gelu_1", 500.0),
               ("triton_poi_fused_gelu_1", 500.0), ("triton_red_fused_layer_norm_2", 1000.0)]
    text = kernel_breakdown(kernels, per=2)
    rows = {line.split("  ")[1].strip(): line for line in text.splitlines()[1:4]}
    assert text.splitlines()[1].split()[0] == "matmul"  # largest first
    assert "2.00 ms" in rows["matmul"] and "66.7%" in rows["matmul"] and "1 kernels" in rows["matmul"]
    assert "1.00 ms" in rows["compiled elementwise"] and "33.3%" in rows["compiled elementwise"]
    assert "3.00 ms" in text.splitlines()[3]  # the total per step
    top = [line.split() for line in text.splitlines()[-2:]]  # the fused kernels: 0.5 ms per step each
    assert sorted((t[0], t[1], t[2]) for t in top) == [("0.50", "0.5", "triton_red_fused_layer_norm_2"),
                                                       ("0.50", "1", "triton_poi_fused_gelu_1")]
    # the optimizer kind's own kernels are listed too, long template names cut in the middle
    adam = "void multi_tensor_apply_kernel<" + "x" * 200 + "FusedAdamMathFunctor<float>>"
    text = kernel_breakdown(kernels + [(adam, 800.0), ("some_custom_kernel", 100.0)], per=2)
    lines = text.splitlines()
    head = lines.index("top 5 optimizer, EMA, grad norm kernels (ms per step, calls per step):")
    listed = lines[head + 1].split(None, 2)
    assert listed[:2] == ["0.40", "0.5"] and listed[2].startswith("void multi_tensor_apply_kernel<")
    assert listed[2].endswith("FusedAdamMathFunctor<float>>") and len(listed[2]) == 110 and " .. " in listed[2]
    assert lines[lines.index("top 5 other kernels (ms per step, calls per step):") + 1].split() == [
        "0.05", "0.5", "some_custom_kernel"]
    # with the step's unprofiled time: how long the GPU idles per step (3.45 ms of kernels per step)
    text = kernel_breakdown(kernels + [(adam, 800.0), ("some_custom_kernel", 100.0)], per=2, step_ms=4.6)
    assert "GPU busy 3.5 ms of the 4.6 ms step (timed without the profiler): idle 1.1 ms (25.0%)" in text
