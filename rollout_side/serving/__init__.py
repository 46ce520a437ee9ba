"""The serving faces: generation admitted by the version gate, over gRPC and OpenAI-compatible HTTP.

generation.py is the one Generate core every face calls; openai_api.py and openai_schema.py are the
HTTP routes and their request parsing, openai_limits.py what every HTTP request is checked for before
any work (sizes, fields, counts, model); vllm_openai.py puts vLLM's own OpenAI serving layer behind the
same gate on the vLLM engine.
"""
