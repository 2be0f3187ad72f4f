"""``rackguard gateway``: an OpenAI-compatible admission gateway that obeys the cap.

It sits in front of unmodified inference servers (vLLM, SGLang, TGI, llama.cpp) and
keeps the requests in flight to each under the sum of its GPUs' caps, with workload
classes, spill-over to a fallback pool, and per-request energy. See ``server.py``.
"""
