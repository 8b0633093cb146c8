"""The paper's experiment at a configurable scale (:mod:`~modlora.study.run`) and the demo built on it
(:mod:`~modlora.study.demo`)."""
