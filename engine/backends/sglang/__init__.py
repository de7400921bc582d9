"""SGLang rollout backend: drives SGLang servers over their HTTP API, behind the rollout protocol.

A ``SGLangRolloutWorker`` (one Ray actor per ``rollout.workers``) owns a few servers: it
launches them (``python -m sglang.launch_server``) or attaches to given URLs, keeps them
healthy, pushes every weight version to each of them and splits generation across the
servers that hold the version the driver expects.

SGLang endpoints used (sglang/srt/entrypoints/http_server.py):
  POST /generate                          {"input_ids": [[...]], "sampling_params": {...}, "return_logprob": true}
                                          -> [{"output_ids": [...], "meta_info": {"output_token_logprobs":
                                              [[logprob, token_id, text], ...], "weight_version": "...", ...}}]
  GET  /health_generate                   200 once a one-token generation goes through; 503 while starting
  POST /update_weights_from_disk          {"model_path", "load_format", "weight_version"} -> {"success", "message"}
  POST /update_weights_from_tensor        {"serialized_named_tensors": [per TP rank], "flush_cache", "weight_version"}
  POST /init_weights_update_group         {"master_address", "master_port", "rank_offset", "world_size", "group_name", "backend"}
  POST /update_weights_from_distributed   {"names", "dtypes", "shapes", "group_name", "flush_cache", "weight_version"}
  GET  /get_weight_version, POST /update_weight_version {"new_version", "abort_all_requests"}

Health: a launched server gets ``startup_grace_s`` to come up (failed checks while it warms
up are not counted); after that ``failure_threshold`` consecutive failed checks declare it
dead (a launched process that exited is dead at once). A dead launched server is restarted
(bounded by ``max_restarts``) and receives the current weights before it serves again; an
attached server that dies is left out until it answers again, then re-synced. Every server's
weight version is tracked; generation uses only servers holding the expected version, and a
response that reports another version is refused.

Modules: client (one server's HTTP API), servers (launching), health (checks, restarts,
re-sync), weights (pushing a version to a server), worker (the Ray actor).
"""
