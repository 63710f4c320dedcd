"""Pipeline parallelism's accounting: which layers each stage holds (:mod:`.split`).  The bilevel step across
stages is :mod:`megatron_focusft.schedule`."""
