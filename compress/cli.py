"""`vlm-compress`: a thin wrapper over the API. Expected failures print one message, no traceback."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from compress import __version__
from compress.errors import CompressError, InternalError, first_line


def _cmd_validate(args: argparse.Namespace) -> int:
    from compress.recipe import load_recipe

    lr = load_recipe(args.recipe)
    r = lr.recipe
    stages = ", ".join(f"{s.name or s.type}" for s in r.stages)
    print(f"{args.recipe}: ok: recipe '{r.name}', model {r.model.source}, {len(r.stages)} stage(s): {stages}")
    if r.search is not None:
        from compress.search.space import trial_count

        s = r.search
        print(f"search: {s.algorithm}, {trial_count(s)} trials over {len(s.space)} field(s) ({', '.join(s.space)}), "
              f"{s.max_concurrent} at a time; minimize {s.objective.minimize} among trials passing every gate")
    from pathlib import Path

    from compress.arch import adapter_for_source
    from compress.plan import check_stages, plan_run
    from compress.zoo import resolve_source

    source = resolve_source(r.model.source, lr.base_dir)
    if Path(source).is_dir():  # a local folder: its config and headers say what the run can do (a hub id: at run)
        check_stages(r, adapter_for_source(source, r.model.trust_remote_code), source, str(lr.path))
        print(f"memory: {plan_run(r, source, str(lr.path)).describe()}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from compress.pipeline import run
    from compress.recipe import load_recipe
    from compress.report import summary

    recipe = load_recipe(args.recipe)
    if recipe.recipe.search is not None:
        print("note: the recipe's search block is not used (`run` runs the recipe as written; see "
              "`vlm-compress search`)", file=sys.stderr)
    result = run(recipe, out=args.out, resume=args.resume, force=args.force, threads=args.threads)
    print(summary(result.manifest))
    print(f"\nrun folder: {result.run_dir}  (report: {result.run_dir / 'report.md'})")
    if result.status == "error":
        failed = next(s for s in result.manifest["stages"] if s["status"] == "error")
        where = f" (partial files: {result.run_dir / failed['partial']})" if failed.get("partial") else ""
        advice = "" if "--resume" in failed["message"] else "; fix it and re-run with --resume"
        print(f"error: stage '{failed['name']}' failed: {failed['message']}{where}{advice}", file=sys.stderr)
        return int(failed["exit_code"])
    if not result.ok:
        stopped = next(s for s in result.manifest["stages"] if s["status"] == "failed")
        print(f"error: stopped at stage '{stopped['name']}': {stopped['message']}", file=sys.stderr)
        return 3
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from compress.search.driver import search

    s = search(args.recipe, out=args.out, address=args.address, max_trials=args.max_trials,
               max_concurrent=args.max_concurrent, resume=args.resume)
    passed = sum(t["status"] == "passed" for t in s["trials"])
    print(f"{len(s['trials'])} trials, {passed} passed every gate; winner: {s['winner'] or 'none'}")
    print(f"search folder: {args.out}  (report: {args.out}/report.md, plot: pareto.png"
          + (", winner's recipe: best.yaml)" if s["winner"] else ")"))
    return 0 if s["winner"] else 3


def _cmd_bench(args: argparse.Namespace) -> int:
    from compress.bench.run import bench, markdown

    result = bench(args.run_dir, batch=args.batch, new_tokens=args.new_tokens, warmup=args.warmup,
                   repeats=args.repeats, providers=args.providers)
    print(markdown(result))
    print(f"written: {result['run']}/bench/bench.json, bench.md, bench.png")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from compress.verify import summary, verify

    result = verify(args.run_dir, load=not args.hash_only)
    print(summary(result))
    return 0 if result.ok else 1


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from compress.evaluate import evaluate, summary

    extract = {k: v for k, v in (("after_last", args.extract_after_last), ("regex", args.extract_regex)) if v}
    result = evaluate(args.path, data=args.data, recipe=args.recipe, reference=args.reference,
                      providers=args.providers, threads=args.threads, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, num_samples=args.num_samples, prompt=args.prompt,
                      extract=extract or None)
    print(json.dumps(result, indent=2) if args.json else summary(result))
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from compress.schema import field_reference, schema_text

    sys.stdout.write(field_reference() if args.markdown else schema_text())
    return 0


def _cmd_zoo_tiny(args: argparse.Namespace) -> int:
    from pathlib import Path

    from compress.artifacts import atomic_dir
    from compress.errors import ConfigError
    from compress.zoo.tiny import FAMILIES, save_tiny

    out = Path(args.out)
    if args.family not in FAMILIES:
        raise ConfigError(f"no tiny model for '{args.family}'; available: {', '.join(FAMILIES)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not an empty folder; nothing written")
    with atomic_dir(out) as tmp:
        save_tiny(args.family, tmp, seed=args.seed)
    print(f"{out}: a tiny random {args.family} model + processor (untrained, seed {args.seed}); "
          "load it with from_pretrained or point a recipe's model.source at it")
    return 0


def _cmd_zoo_big(args: argparse.Namespace) -> int:
    from pathlib import Path

    from compress.artifacts import atomic_dir
    from compress.errors import ConfigError
    from compress.zoo.big import SHAPES, write_big

    out = Path(args.out)
    if args.shape not in SHAPES:
        raise ConfigError(f"no shape '{args.shape}'; available: {', '.join(SHAPES)}")
    too_few = (args.layers is not None and args.layers < 1) or (args.vision_layers is not None and
                                                                 args.vision_layers < 2)
    if too_few:
        raise ConfigError("--layers must be at least 1 and --vision-layers at least 2 (LLaVA reads the "
                          "second-to-last vision layer); nothing written")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not an empty folder; nothing written")
    with atomic_dir(out) as tmp:
        info = write_big(args.shape, tmp, seed=args.seed, max_shard_bytes=int(args.shard_gb * 2**30),
                         layers=args.layers, vision_layers=args.vision_layers)
    depth = "".join(f", {n} {w}" for n, w in ((args.layers, "decoder layers"), (args.vision_layers, "vision layers"))
                    if n)
    print(f"{out}: a random-weight {args.shape}{depth} ({info['parameters']:,} parameters, "
          f"{info['bytes'] / 2**30:.2f} GB in {info['shards']} shards, seed {args.seed}), written shard by shard")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlm-compress", description="Accuracy-gated VLM compression.")
    p.add_argument("--version", action="version", version=f"vlm-compress {__version__}")
    p.add_argument("--debug", action="store_true", help="print the traceback of any error")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check a recipe (schema + ordering) without loading a model")
    v.add_argument("recipe")
    v.set_defaults(fn=_cmd_validate)
    r = sub.add_parser("run", help="run a recipe: baseline, stages, gates, run folder")
    r.add_argument("recipe")
    r.add_argument("--out", help="run folder (default: the recipe's output.dir)")
    r.add_argument("--resume", action="store_true", help="continue a run folder after its last done stage")
    r.add_argument("--force", action="store_true", help="replace an existing run folder's contents")
    r.add_argument("--threads", type=int, help="CPU threads for torch and ONNX Runtime (overrides the recipe)")
    r.set_defaults(fn=_cmd_run)
    se = sub.add_parser("search", help="the smallest recipe variant that passes every gate: the recipe's search "
                                       "block, trials on Ray Tune (local Ray, or a cluster with --address)")
    se.add_argument("recipe")
    se.add_argument("--out", required=True, help="search folder: baseline, trials, report, best.yaml")
    se.add_argument("--address", help="an existing Ray cluster (auto, HOST:PORT or ray://...); default: local Ray "
                                      "started in-process")
    se.add_argument("--max-trials", type=int, help="random / optuna: trials to run; grid: refuse a larger grid")
    se.add_argument("--max-concurrent", type=int, help="trials at once (overrides search.max_concurrent)")
    se.add_argument("--resume", action="store_true", help="finish a killed search: finished trials are kept, "
                    "unfinished ones resume from their last completed stage")
    se.set_defaults(fn=_cmd_search)
    b = sub.add_parser("bench", help="latency / throughput / memory / size of every artifact in a run folder")
    b.add_argument("run_dir")
    b.add_argument("--batch", type=int, default=1, help="questions per call (default 1)")
    b.add_argument("--new-tokens", type=int, default=16, help="tokens generated per call, EOS ignored")
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--providers", nargs="+", help="ONNX Runtime execution providers (default: CPU)")
    b.set_defaults(fn=_cmd_bench)
    vf = sub.add_parser("verify", help="before deploying: re-hash a run folder's files against its manifest, load "
                                       "each checkpoint, check each ONNX graph; exit 1 listing anything wrong")
    vf.add_argument("run_dir")
    vf.add_argument("--hash-only", action="store_true", help="skip loading checkpoints (hashes and graphs only)")
    vf.set_defaults(fn=_cmd_verify)
    e = sub.add_parser("eval", help="score any artifact (transformers folder or ONNX export) with the "
                                    "pipeline's evaluator; writes nothing")
    e.add_argument("path", help="a model folder (plain, compressed-tensors, bitsandbytes) or an ONNX export folder")
    e.add_argument("--data", help="evaluation set (folder with metadata.jsonl, parquet, datasets folder)")
    e.add_argument("--recipe", help="take the evaluation settings (data, prompt, extract, ...) from this recipe")
    e.add_argument("--reference", metavar="RUN_DIR", help="compare with this run's baseline (token agreement, "
                   "KL); its recipe's evaluation settings are the defaults")
    e.add_argument("--prompt", help="prompt template with {question} and the model's image token")
    e.add_argument("--extract-after-last", help="score the text after the last occurrence of this string")
    e.add_argument("--extract-regex", help="score the first match of this regex (its first group if any)")
    e.add_argument("--max-new-tokens", type=int)
    e.add_argument("--batch-size", type=int)
    e.add_argument("--num-samples", type=int, help="first N records only")
    e.add_argument("--providers", nargs="+", help="ONNX Runtime execution providers (default: CPU)")
    e.add_argument("--threads", type=int, help="CPU threads for torch and ONNX Runtime")
    e.add_argument("--json", action="store_true", help="print the full result as JSON")
    e.set_defaults(fn=_cmd_eval)
    s = sub.add_parser("schema", help="print the recipe JSON Schema (for editors and CI), or --markdown the "
                                      "field reference")
    s.add_argument("--markdown", action="store_true", help="the field reference of docs/recipes.md instead")
    s.set_defaults(fn=_cmd_schema)
    z = sub.add_parser("zoo", help="write models to try recipes on")
    zs = z.add_subparsers(dest="zoo_command", required=True)
    t = zs.add_parser("tiny", help="a tiny random model of a supported family (offline, seconds)")
    t.add_argument("family", help="llava, qwen2_vl, qwen2_5_vl, idefics3, smolvlm, paligemma, gemma3, internvl, mllama")
    t.add_argument("--out", required=True, help="folder to create (must not exist, or be empty)")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(fn=_cmd_zoo_tiny)
    b = zs.add_parser("big", help="a realistic-shape random LLaVA of any size, written shard by shard "
                                  "(llava-1.5-7b: ~28 GB fp32)")
    b.add_argument("shape", help="llava-1.5-7b, llava-small, llava-test")
    b.add_argument("--out", required=True, help="folder to create (must not exist, or be empty)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--shard-gb", type=float, default=1.0, help="largest shard (one shard is in memory at a time)")
    b.add_argument("--layers", type=int, help="decoder layers instead of the shape's (same block size)")
    b.add_argument("--vision-layers", type=int, help="vision layers instead of the shape's (at least 2)")
    b.set_defaults(fn=_cmd_zoo_big)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.fn(args)
    except CompressError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; completed stages are kept (re-run with --resume)", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: one line unless --debug (a run keeps it in logs/)
        if args.debug:
            traceback.print_exc()
        hint = "" if args.debug else " (run with --debug for the traceback)"
        print(f"error: internal error: {first_line(e)}{hint}", file=sys.stderr)
        return InternalError.exit_code


if __name__ == "__main__":
    sys.exit(main())
