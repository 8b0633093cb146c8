"""The library: experts stored as PEFT adapter files with a manifest (:mod:`~modlora.library.store`), their
in-memory form (:mod:`~modlora.library.adapters`, :mod:`~modlora.library.experts`) and remote copies on the Hub or
any fsspec URL (:mod:`~modlora.library.remote`)."""
