"""``make bench`` (``python -m bench``): side-by-side ratios of auto-trace against plain baselines,
measured in one run against one broker.

The broker comes from :func:`consumer.broker.kafka_cluster` (``KAFKA_BOOTSTRAP_SERVERS`` if set,
else one started locally). Every topic has 6 partitions and ``message.timestamp.type =
LogAppendTime``, so the time a record reached a topic is the broker's append time, on one clock,
read from the record itself. Every stage runs as its own process (``python -m consumer run
--role ...``, the deployed program, with the default client settings), as do the baselines and
the receiver, so no two share a GIL. Inputs are pre-loaded with a fast producer before anything
is timed; everything the run creates is deleted at the end.

The ratios R1, R1b, R4 and R6 are measured in rounds (``BENCH_ROUNDS``, 5 by default): each
measured leg runs between two baseline legs, is divided by their mean, and the median of the
rounds is the ratio reported (every leg's rate is printed, in the order run). On a shared
machine a single pair of legs can be off by a third either way; a leg between two baselines
sees the drift on both sides, and the median drops the rounds a burst of other work hit. With
three rounds, R1's reported figure moved by ±0.07 from one run to the next on the same code;
five narrow that (the median of five is less often an outlier round), and do not move its
centre.

R1    ingest records/s ÷ passthrough records/s. The same pre-loaded ``trade.closed`` topic
      (200k realistic trades, see :mod:`bench.data` for the ~525-byte records) is read by a
      plain consume → produce copy (:mod:`bench.passthrough`: same librdkafka settings, same
      batch size, no decoding) and by the ingest stage, in turn: copy, ingest, copy, (R1b),
      copy, ingest, ...; each rate is records ÷ (last - first append time on its output
      topic), so consumer-group start-up is not counted.
R1b   ingest + release (window 0, one adapter), one process each, on the same input, between
      two copies; the rate is taken on the sink topic in the same way.
R3    release lateness: 20k trades produced at a steady 1,000/s with close_time = now flow
      through ingest and release (window 2 s); lateness = sink-topic append time - the
      record's due header (close_time + window). p50, p99, max, and the count released early.
      3k warm-up trades go through first, unmeasured: a broker just started spends its first
      seconds warming up, and a new idempotent producer sends nothing for ~0.5-1 s.
R4    webhook deliveries/s (the sink worker delivering 10k pre-loaded sink-topic records)
      ÷ raw aiohttp POSTs/s of the same bodies with the same headers at the same concurrency
      (16, the adapter's default): raw, sink, raw, (R6), sink, raw, ... Then once each: the
      webhook adapter's own HTTP/1.1 client alone on the same bodies (how much of R4 is the
      client), and raw httpx on 2k bodies, both ÷ the median raw aiohttp run. The receiver
      (:mod:`bench.server`) is a separate process and a bare asyncio HTTP/1.1 server, several
      times cheaper per request than the clients, and times every run: successes ÷ (last
      success - first request).
R6    the retry path's deliveries/s ÷ the main path's (R4's sink legs just before and after).
      A sink worker whose every first attempt is answered 503 moves the 10k records to the first
      retry tier (5 s, the default) and is stopped; once all are due, a new worker of the same
      group delivers them from the tier (the receiver now answers 200), timed from the first
      to the last success, as the main path's legs are. The circuit breaker, which would take
      "every first attempt fails" for an outage, is kept closed. Also shown, not a goal: 5k
      records whose failed first attempt and retry (200 ms tier) share one running worker,
      records delivered/s from the first request: at most 0.5 by construction (two attempts a
      record), and what a receiver failing everything once costs end to end.
MEM   the release stage's peak RSS (``VmHWM`` of its process) with 1M records waiting (due in
      1 h) ÷ with 10k waiting, read once every partition is held plus 3 s; the sink topic is
      checked to be empty (nothing released early).
SEED  trades/s end to end: 10k pre-loaded trades through ingest, release and the sink worker
      (one process each, window 0) to the receiver, first to last delivery; shown next to the
      original design's ceiling of 10 trades per 5 minutes.

Each rate is shown with the CPU share of its process over exactly the measured interval
(sampled from /proc): a stage near 100 % of a core is CPU-bound, one well below is waiting.

Environment:
    BENCH_SCALE=0.1        shrink every record count (default 1.0; floors keep runs meaningful)
    BENCH_ROUNDS=5         rounds of each measured leg between baselines (1 for a quick look)
    BENCH_ONLY=R4,R6       run only these scenarios (R1b runs R1; R6 runs R4)
    BENCH_KAFKA_CLIENT='{"queued.max.messages.kbytes": 1024}'
                           extra librdkafka settings for every stage (try a tuning, no edits)
    BENCH_PROFILE=DIR      attach ``py-spy record`` to each process (collapsed stacks in DIR;
                           py-spy is not a dependency: ``.venv/bin/pip install py-spy``);
    BENCH_PROFILE_IDLE=1   ... including time spent waiting (shows blocking calls)
    BENCH_PROFILE_GIL=1    ... only the thread holding the GIL (where Python CPU goes)

The output is a table (each ratio with its inputs and the raw rates behind it), the goal checks,
and as the last line one JSON object (:data:`bench.report.JSON_KEYS`). Stage logs and configs are
left in ``bench-output/``. A run at scale 1.0 takes about 4 minutes on 2 cores (more when other
work competes); no scenario starts after 10 minutes and no wait outlasts that by more than 2, so
``make bench`` ends within 15.
"""
