"""Benchmarks and load tools for the service, one concern per module; runnable as `python -m loadtest.<bench>`.

- `images`: the image sets (JPEG re-encodes of the repository's radiographs; the realistic set of JPEG, 8/16-bit
  PNG and DICOM at real sizes);
- `drivers`: the one load driver (closed loop, open loop with Poisson arrivals, one keep-alive lane per client);
- `resources`: CPU, RSS and queue-depth sampling of the server under test;
- `stats`: percentiles, outcome summaries, the server's Prometheus histograms;
- `servers`: servers under test as real processes (also the tests' `bfd serve` helper);
- `machine`: the machine's description every figure carries;
- `baselines`: the naive ONNX and original-style Keras servers the service is compared with;
- `load_report`: the Markdown of `bench_load`;
- the benchmarks: `bench_load` (ours vs the baselines under load), `bench_admission` (realistic radiographs,
  capacity then 2x overload), `bench_service` (in-process ceiling and HTTP), `bench_bundle` (fp32 vs INT8),
  `bench_decode` (codec vs the project's decode), `bench_gpu` (CUDA, IOBinding, fp16);
- `locustfile`: the same load for Locust users;
- failover of replicas behind HAProxy under a `kill -9` (`python -m loadtest.failover`): `replicas` (a fresh
  database, replicas started at the same moment), `haproxy` (its configuration, stats socket and log),
  `dicom_destination` (a storage SCP that records what it receives), `failover_report` (the counts).
They import the core (`inference`), never the HTTP service's code: the service is driven as a process over HTTP.
No module reads settings or the environment at import time.
"""
