"""kt.teacher_cache (`kt-cache`): run the teacher once over a transfer set and keep what it said.

`build` runs the teacher over webdataset shards with views drawn from a fixed seed, on any number of accelerate
ranks (each takes whole shards), and writes per input shard the keys, the view parameters and the encoded targets
(logits, embedding, patch grid) into one Zarr v3 store, marking each shard complete in one atomic step so a killed
job resumes where it stopped. `store` is the schema (attributes, fingerprints, completion markers), `codecs` the
target encoders and their fidelity (`device_encode` their torch twins for the heavy targets, run where the
teacher runs), `reader` the only way the rest of kt reads a cache (targets for a shard,
aligned with its samples, views re-checked against the seed), and `inspection` what `plan`, `info` and `verify`
compute. The CLI (`cli`) only parses and prints. This package depends on `kt` alone; `kt.student` depends on it
through the reader.
"""
