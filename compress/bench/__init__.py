"""`vlm-compress bench RUN_DIR`: latency, throughput, memory and size of every artifact in a run, and the
decode floor each is measured against.

The package owns measuring: `run` drives a benchmark of a run folder and writes its results, `measure` is
the subprocess that measures one artifact, `timing` the one warm-up/median timer (also used by
`benchmarks/`), `floor` the memory bandwidth and the bytes a decode step must read.

Why it is built this way:

- Each artifact (the source model, every kept checkpoint, every export) is measured in its own fresh
  subprocess, so its peak RSS (`ru_maxrss` at the end) is its own and one artifact's allocator state
  or thread pools cannot slow the next. A reference subprocess that imports the same libraries and
  loads the same inputs, but no model, gives the floor that `net_rss_mb` subtracts.
- All artifacts run on the same inputs (the first `batch` records of the run's evaluation set) and
  generate exactly `new_tokens` tokens (EOS ignored), so output length cannot favour anyone.
- Warm-ups are excluded; every number is the median of the repeats.
- Ratios are against the source model measured in the same invocation on the same machine.
- Results go to RUN_DIR/bench/ (atomically) and nowhere else; the manifest is not touched.

What each metric is:

- `vision_ms_per_image`: the vision tower + projector alone on one image (batch 1).
- `ttft_ms`: time to first token inside `generate` (vision + embedding + prefill + first argmax) at
  the bench batch size; from the runner's `timings`.
- `decode_tokens_per_s`: rows x decode steps / decode seconds, i.e. tokens per second after the
  first one (per-step time is `decode_ms_per_step`).
- `e2e_ms`: image -> answer text: processor (image preprocessing, tokenization) + `generate` +
  detokenization, for the whole batch; `preprocess_ms` is the processor's share, on its own.
- `decode_floor_ms` / `decode_x_floor`: what one decode step must read (decoder weights once, the KV cache
  of every row at the middle of the answer) over the memory bandwidth (compress.bench.floor: the fastest of the
  copies taken before the artifacts and after each one measured in this invocation), and the measured step as
  a multiple of it.
"""
