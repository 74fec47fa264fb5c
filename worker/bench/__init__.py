"""``plugin-state-worker bench``: the worker measured side by side with its ceilings.

One run creates a database and a topology prefix of its own, measures, and removes both.
Each module owns one part, in the order a run goes through them:

| module | owns |
|---|---|
| ``command`` | the click command, its flags and presets |
| ``run`` | the sizes and the order of the phases |
| ``harness`` | the bench's own database, prefix, processes, publishing and progress bars |
| ``workload`` | realistic write commands and read requests |
| ``ceiling`` | raw aio-pika through a quorum queue, no database |
| ``baseline`` | the naive consumer: one upsert, one transaction, one ack per message |
| ``peers`` | what a user would run instead: a FastStream subscriber, direct upserts (no queue) |
| ``subscriber`` | that FastStream subscriber, as a process of its own |
| ``writes`` | the worker's write throughput and publish-to-commit latency |
| ``servers`` | the reference RPC servers (constant reply; one ``SELECT``), as processes |
| ``reads`` | one RPC client loop against the reference servers and the worker |
| ``memory`` | the worker's resident memory at full load and through a soak |
| ``report`` | the figures, the ratios the targets name, the table and the JSON |
| ``plots`` | the PNG charts of ``--plot`` |
"""
