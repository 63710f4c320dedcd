"""Pipeline parallelism: which layers each stage holds (:mod:`.split`) and the bilevel step across stages
(:mod:`.schedule`)."""
