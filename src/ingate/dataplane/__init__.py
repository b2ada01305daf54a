"""Data planes: the built-in asyncio proxy and Envoy (ext_proc) around the same director."""
