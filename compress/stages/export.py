"""`type: export`: write ONNX graphs, prove them against PyTorch, and hand the gate an ONNX Runtime runner.

The stage's accuracy check answers the evaluation questions through the exported files themselves
(the pipeline evaluates the runner this stage returns), so what passes the gate is what ships.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator

from compress.checkpoint import save_processor
from compress.config import StageConfig, Strict
from compress.errors import ConfigError
from compress.registry import register_stage
from compress.stages.base import StageContext, StageResult

Graph = Literal["vision", "embed", "decoder", "end_to_end"]


class OptimizeConfig(Strict):
    fusion: bool = Field(True, description="onnxscript + onnxruntime transformer fusions")
    group_query_attention: bool = Field(
        True, description="decoder self-attention as com.microsoft GroupQueryAttention (the kernel appends the KV "
        "cache and reads grouped heads; no per-step Concat/Expand of the cache); with fusion, for ONNX Runtime "
        "targets, on every family but Mllama")


# Why a tensorrt-target export refuses INT4 and W8A16 levels of different kinds (at recipe load and at export).
SAME_FUSION_KIND = ("which ONNX Runtime fuses under one session setting: give int4_accuracy_level and "
                    "w8a16_accuracy_level the same kind (0/1: float, 4: int8 activations)")


class ParityConfig(Strict):
    metric: Literal["auto", "max_abs", "distribution"] = Field(
        "auto", description="how the graphs are judged against the PyTorch model they came from: max_abs, every "
        "output of every graph within atol + rtol*|ref|; distribution, next-token KL and top-1 agreement of the "
        "end-to-end logits at the evaluation set's answer positions (max abs errors reported, not judged); auto: "
        "max_abs for float graphs, distribution where they carry quantized layers, which integer kernels round "
        "differently from PyTorch's float fake-quant (a value on a rounding boundary lands one step apart)")
    atol: float | dict[Graph, float] = Field(1e-4, description="absolute tolerance vs PyTorch (max_abs): one number "
                                                               "or per graph")
    rtol: float | dict[Graph, float] = Field(1e-3, description="relative tolerance vs PyTorch (max_abs): one number "
                                                               "or per graph")
    max_kl: float = Field(0.1, ge=0, description="distribution: the largest mean KL(PyTorch || graphs), in nats")
    min_top1: float = Field(0.85, ge=0, le=1, description="distribution: the least share of positions where the "
                                                          "graphs' top-1 token is PyTorch's")
    decode_steps: int = Field(3, ge=1, le=64, description="KV-cache decode steps compared after the prefill")

    def judged_by(self, quantized: bool) -> str:
        """max_abs or distribution: what `auto` means for graphs that do or do not carry quantized layers."""
        if self.metric != "auto":
            return self.metric
        return "distribution" if quantized else "max_abs"


class ExportConfig(StageConfig):
    type: Literal["export"]
    format: Literal["onnx"] = Field(description="ONNX graphs (vision encoder, embeddings, KV-cache decoder)")
    target: Literal["onnxruntime", "tensorrt"] = Field(
        "onnxruntime", description="onnxruntime: fused with ORT contrib ops, portable INT8 kernels; tensorrt: standard "
        "ops only (no ORT fusion), INT8 as signed Q/DQ with the quantize stage's scales, ready for a `type: engine` "
        "stage; still scored in ONNX Runtime")
    opset: int | None = Field(
        None, ge=18, le=23, description="ONNX opset; default 18 for onnxruntime (its fusion passes take opsets "
        "18-21) and 23 for tensorrt (standard Attention with a boolean mask, RMSNormalization, RotaryEmbedding)")
    # Both graphs are needed for the gate: it answers questions through the exported files.
    components: list[Literal["vision", "decoder"]] = Field(
        default_factory=lambda: ["vision", "decoder"], description="both: the gate answers through the files")
    optimize: OptimizeConfig = Field(OptimizeConfig(), description="graph fusions")
    quantize: Literal["from_stage", "none"] = Field(
        "from_stage", description="carry INT8 (Q/DQ, MatMulInteger) and NF4 (MatMulBnb4) into the graphs, or "
        "export the same numbers as float ops")
    # portable: W8A8 graphs exact on every CPU (U8U8 where S8 weights could saturate non-VNNI kernels);
    # vnni: fastest on VNNI/AMX hosts, recorded as needing one (compress.export.portable).
    int8_kernels: Literal["portable", "vnni"] = Field(
        "portable", description="portable: same numbers on every CPU; vnni: faster on AVX-512 VNNI / AVX-VNNI / "
        "AMX hosts, recorded as needing one")
    int4_accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        0, description="INT4 layers (com.microsoft MatMulNBits): 0/1 compute in float32 from the int4 weights "
        "(the quantize stage's numbers); 4 quantizes activations to int8 per block on CPU (faster, not exact; "
        "the gate measures it)")
    w8a16_accuracy_level: Literal[1, 4] = Field(
        1, description="INT8 weight-only (W8A16) layers, which ONNX Runtime fuses into 8-bit MatMulNBits: 1 computes "
        "in float32 from the int8 weights (the quantize stage's numbers) through onnxruntime's reference kernel, "
        "~20x slower than 4 on CPU (384 vs 18 ms per decode step on the realistic decoder, slower than the fp32 "
        "export); 4 quantizes activations to int8 per block of 32 (not exact: SmolLM2-135M token agreement 0.969 -> "
        "0.950; the gate measures it)")
    int4_prefill: Literal["int4", "int8"] = Field(
        "int4", description="int8: also write prefill.onnx, the decoder with its INT4 projections (lm_head "
        "excepted) as 7-bit int8 GEMMs with per-token activations, which the runner uses for prompts: ~0.65x the "
        "prefill time of MatMulNBits on CPU (realistic model), for the int8 copy of the projections in memory and "
        "on disk; decode steps keep INT4. The gate measures both graphs")
    parity: ParityConfig = Field(ParityConfig(), description="tolerances of the parity check vs PyTorch")
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"], min_length=1,
                                 description="ONNX Runtime execution providers the gate's evaluation runs on; "
                                 "unavailable ones are skipped, CPU is the fallback")

    accepts = frozenset({"float", "sparse", "fake_quant", "quantized"})
    requirement = "a PyTorch model (float, sparse or quantized); export it once, at the end"

    def output_state(self, state: str) -> str:
        return "exported"

    @field_validator("opset")
    @classmethod
    def _opset_fits_target(cls, opset: int | None, info: ValidationInfo) -> int | None:
        if opset is not None and opset > 21 and info.data.get("target", "onnxruntime") == "onnxruntime":
            raise ValueError(f"opset {opset} needs target: tensorrt; the onnxruntime target's fusion passes "
                             "(GroupQueryAttention, MatMulNBits, integer kernels) take opsets 18-21")
        return opset

    @field_validator("int4_prefill")
    @classmethod
    def _prefill_fits_target(cls, prefill: str, info: ValidationInfo) -> str:
        if prefill == "int8" and info.data.get("target", "onnxruntime") != "onnxruntime":
            raise ValueError("int4_prefill: int8 writes an ONNX Runtime graph (MatMulInteger with per-token "
                             "scales); the tensorrt target builds one engine per graph: leave it at int4")
        return prefill

    @property
    def onnx_opset(self) -> int:
        """The opset graphs are written in: 23 lets TensorRT read attention, norms and rotary as single ops."""
        return self.opset if self.opset is not None else (23 if self.target == "tensorrt" else 18)

    def check_after(self, earlier: list[StageConfig]) -> str | None:
        """The int8 prefill needs INT4 layers carried into the graphs. TensorRT takes static Q/DQ only: dynamic
        INT8 (MatMulInteger) and NF4 (MatMulBnb4) cannot run there."""
        if self.int4_prefill == "int8" and self.quantize != "from_stage":
            return "int4_prefill: int8 rewrites the decoder's INT4 projections, which quantize: none exports as float"
        if self.int4_prefill == "int8" and not any(getattr(s, "scheme", None) == "int4" for s in earlier):
            return ("int4_prefill: int8 rewrites the decoder's INT4 projections, and no earlier quantize stage "
                    "has scheme: int4")
        trt = "TensorrtExecutionProvider" in self.providers or self.target == "tensorrt"
        if not trt or self.quantize != "from_stage":
            return None
        from compress.export.qdq import same_fusion_kind

        int4 = any(getattr(s, "scheme", None) == "int4" for s in earlier)
        w8a16 = any(getattr(s, "scheme", None) == "int8" and getattr(s, "activations", None) == "none" for s in earlier)
        if (self.target == "tensorrt" and int4 and w8a16
                and not same_fusion_kind(self.int4_accuracy_level, self.w8a16_accuracy_level)):
            return ("w8a16_accuracy_level: the tensorrt target exports INT4 and INT8 weight-only layers as "
                    f"DequantizeLinear, {SAME_FUSION_KIND}")
        for stage in earlier:
            if getattr(stage, "dynamic_activations", False):
                return (f"TensorRT (target / provider) cannot run the dynamic INT8 activations of "
                        f"stage '{stage.name or stage.type}' (MatMulInteger with run-time scales; TensorRT "
                        "accepts static QuantizeLinear/DequantizeLinear only): use activations.calibration")
            int4 = getattr(stage, "int4", None)
            if getattr(stage, "scheme", None) == "int4" and int4 is not None and not int4.symmetric:
                return (f"TensorRT takes INT4 weights as DequantizeLinear without zero points; stage "
                        f"'{stage.name or stage.type}' has them (int4.symmetric: false): use symmetric: true")
            if getattr(stage, "scheme", None) == "nf4":
                return (f"TensorRT (target / provider) cannot run the NF4 layers of stage "
                        f"'{stage.name or stage.type}' (bitsandbytes NF4 has no TensorRT form; com.microsoft "
                        "MatMulBnb4 is an ONNX Runtime op): use int8 with activations.calibration")
        return None

    @model_validator(mode="after")
    def _both_graphs(self) -> ExportConfig:
        if sorted(set(self.components)) != ["decoder", "vision"]:
            raise ValueError("components must be [vision, decoder]: the gate answers questions through "
                             "both exported graphs")
        return self


@register_stage(ExportConfig)
def apply(model: torch.nn.Module, cfg: ExportConfig, ctx: StageContext) -> StageResult:
    from compress.checks.gate import CheckResult
    from compress.export.onnx import export_onnx
    from compress.export.parity import ParityError, check_parity
    from compress.host import cpu_features
    from compress.runtime.ort_runner import OrtRunner, session_options

    out = ctx.workdir / "onnx"
    tensorrt = cfg.target == "tensorrt"
    # TensorRT parses standard ops and signed, zero-point-0 Q/DQ: no ORT fusion, no uint8 portable rewrite.
    result = export_onnx(model, ctx.adapter, ctx.processor, out, opset=cfg.onnx_opset, components=cfg.components,
                         fusion=cfg.optimize.fusion and not tensorrt, quantize=cfg.quantize == "from_stage",
                         int8_kernels="vnni" if tensorrt else cfg.int8_kernels,
                         int4_accuracy_level=cfg.int4_accuracy_level,
                         group_query_attention=cfg.optimize.fusion and cfg.optimize.group_query_attention
                         and not tensorrt, select_logits=not tensorrt, int4_prefill=cfg.int4_prefill,
                         w8a16_accuracy_level=cfg.w8a16_accuracy_level)
    if tensorrt:
        result.meta = _tensorrt_meta(out, cfg)
    save_processor(ctx.processor, out)  # the folder answers questions on its own: graphs + processor
    ctx.fault_point()  # graphs written, not yet checked or kept
    try:
        parity = check_parity(model, ctx.adapter, ctx.processor, out, atol=cfg.parity.atol, rtol=cfg.parity.rtol,
                              decode_steps=cfg.parity.decode_steps, providers=cfg.providers, seed=ctx.seed,
                              session_options=session_options(ctx.threads))
        failures: list[str] = []
    except ParityError as e:
        parity, failures = e.errors, e.failures
    runner = OrtRunner.from_dir(out, providers=cfg.providers, session_options=session_options(ctx.threads))
    judged = cfg.parity.judged_by(bool(result.quantized.get("modules")))
    if judged == "max_abs":  # a check like the accuracy ones: the gate's on_fail decides
        worst = max(parity.values(), default=0.0)
        checks = [CheckResult("parity", 0.0, worst, None, _max_tol(cfg.parity.atol), not failures)]
        judgement: dict = {}
    else:
        judgement, checks = _distribution(model, runner, cfg, ctx)
    files = {name: {"file": path.name, "bytes": path.stat().st_size} for name, path in result.files.items()}
    notes = {"note": speed_note(result.meta)}
    return StageResult(model, {
        "format": cfg.format,
        "target": cfg.target,
        "opset": result.meta.get("opset", cfg.onnx_opset),
        "providers": runner_providers(runner),
        "files": files,
        "total_bytes": sum(f["bytes"] for f in files.values()),
        "fused_ops": result.meta.get("fused_ops", {}),
        "quantized": result.quantized.get("summary", result.quantized),
        "int8_kernels": result.meta.get("int8_kernels"),
        "decoder_attention": result.meta.get("decoder_attention"),
        "host_cpu": cpu_features(),
        "parity_judged_by": judged,
        **judgement,
        "parity_max_abs_error": parity,
        "parity_failures" if judged == "max_abs" else "parity_max_abs_misses": failures,
        **{k: v for k, v in notes.items() if v},
    }, runner=runner, artifacts=out, checks=checks)


def _tensorrt_meta(out: Path, cfg: ExportConfig) -> dict:
    """The tensorrt target's graphs: INT4 as blocked DequantizeLinear, fused ops as the exporter wrote them."""
    from compress.export.files import read_meta, write_meta
    from compress.export.fuse import count_ops
    from compress.export.nbits import QDQ_OPSET, export_to_dequantize
    from compress.export.qdq import NBITS_FUSION_LEVEL_KEY, same_fusion_kind

    int4 = export_to_dequantize(out)  # MatMulNBits -> blocked int4 DequantizeLinear + MatMul (opset 21)
    meta = {**read_meta(out), "target": "tensorrt"}
    # No ORT fusion here: what is fused is what the exporter wrote as single standard ops (opset 23:
    # Attention, RMSNormalization, RotaryEmbedding), which TensorRT maps onto its own kernels.
    meta["fused_ops"] = {g: {"by": f"torch.onnx, opset {cfg.onnx_opset}", "after": count_ops(out / f)}
                         for g, f in meta["graphs"].items() if g != "embed"}
    if int4:  # ORT fuses DQ -> MatMul back into MatMulNBits; it computes at the stage's accuracy level
        meta.update(opset=max(meta["opset"], QDQ_OPSET), int4_dequantize_linear=int4)
        # A recipe's own INT4 + W8A16 stages are checked when it loads (check_after); this catches W8A16
        # layers the source checkpoint already had.
        config, level = meta["session"]["config"], str(cfg.int4_accuracy_level)
        if not same_fusion_kind(config.get(NBITS_FUSION_LEVEL_KEY, level), level):
            raise ConfigError(f"export: this model has INT4 and INT8 weight-only layers, {SAME_FUSION_KIND}")
        config[NBITS_FUSION_LEVEL_KEY] = level
    write_meta(out, meta)
    return meta


def _distribution(model: torch.nn.Module, runner: object, cfg: ExportConfig,
                  ctx: StageContext) -> tuple[dict, list]:
    """Next-token KL and top-1 agreement of the graphs against the PyTorch model, at the evaluation set's answer
    positions (the positions the gate scores): two checks, judged by the gate's on_fail like the accuracy ones."""
    from compress.checks.gate import CheckResult
    from compress.export.parity import distribution_parity
    from compress.runtime.torch_runner import TorchRunner

    if ctx.answer_logits is None:
        raise ConfigError("export: parity by distribution compares answers on the evaluation set; this stage "
                          "runs without one (use parity.metric: max_abs)")
    ref = ctx.answer_logits(TorchRunner.for_adapter(model, ctx.adapter, ctx.processor))
    got = ctx.answer_logits(runner)
    d = distribution_parity(ref, got)
    p = cfg.parity
    return ({"parity_kl": d["kl"], "parity_top1": d["top1"], "parity_positions": d["positions"]},
            [CheckResult("parity_kl", 0.0, d["kl"], None, p.max_kl, d["kl"] <= p.max_kl),
             CheckResult("parity_top1", 1.0, d["top1"], None, p.min_top1, d["top1"] >= p.min_top1)])


def speed_note(meta: dict) -> str | None:
    """What the report says when an export will run a slow kernel the recipe chose: exactness was asked for,
    but the user should know what it costs and which setting trades it."""
    from compress.export.qdq import NBITS_FUSION_LEVEL_KEY

    level = meta.get("session", {}).get("config", {}).get(NBITS_FUSION_LEVEL_KEY)
    if meta.get("target") != "tensorrt" and level == "1":
        return ("INT8 weight-only layers compute at w8a16_accuracy_level 1 (exact), which onnxruntime's CPU kernel "
                "does as a reference loop: ~20x slower per decode step than level 4 and slower than the fp32 export; "
                "w8a16_accuracy_level: 4 is the fast setting (int8 activations per block of 32; the gate measures it)")
    return None


def _max_tol(atol: float | dict[str, float]) -> float:
    return max(atol.values()) if isinstance(atol, dict) else float(atol)


def runner_providers(runner: object) -> list[str]:
    sessions = getattr(runner, "sessions", {})
    first = next(iter(sessions.values()), None)
    return list(first.get_providers()) if first is not None else []
