"""The library: experts stored as PEFT adapter files with a manifest (:mod:`~modlora.library.store`), their
in-memory form (:mod:`~modlora.library.adapters`, :mod:`~modlora.library.experts`) and shared copies on the Hub or
any fsspec URL: where they live (:mod:`~modlora.library.location`), their checked file index
(:mod:`~modlora.library.index`), reading one (:mod:`~modlora.library.remote`), push and pull
(:mod:`~modlora.library.transfer`) and the library card (:mod:`~modlora.library.card`)."""
