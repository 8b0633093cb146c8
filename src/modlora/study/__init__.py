"""The paper's experiment at a configurable scale and the demo built on it: :mod:`~modlora.study.config` (what a
study builds and evaluates), :mod:`~modlora.study.run` (build, evaluate, resume), :mod:`~modlora.study.stats`
(paired differences across tasks), :mod:`~modlora.study.report` (tables and plots), :mod:`~modlora.study.main_job`."""
