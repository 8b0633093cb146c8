"""Code grading that the graded program cannot forge: the program only answers calls in its sandbox, the benchmark's
tests run in the judge's, and the verdict is the judge's. Each attack that passed the old single-program grader
(a pass token on stdout) is shown failing here, on bubblewrap and on the subprocess fallback."""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter, OrderedDict, namedtuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modlora.evaluation.code import (
    CodeTests,
    decode_plain,
    encode_plain,
    grade_many,
    grade_program,
    humaneval_candidate,
    humaneval_tests,
    load_humaneval,
    load_mbpp,
    mbpp_tests,
)
from modlora.evaluation.sandbox import Sandbox, SandboxIsolationWarning


def _quiet_sandbox(**kwargs) -> Sandbox:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SandboxIsolationWarning)
        return Sandbox(timeout_s=5.0, memory_mb=512, **kwargs)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    """bwrap where it works, else the subprocess fallback."""
    return _quiet_sandbox()


@pytest.fixture(scope="module")
def fallback() -> Sandbox:
    return _quiet_sandbox(use_bwrap=False)


SQ = {"task_id": "t/sq", "prompt": "def sq(x):\n    \"\"\"Square.\"\"\"\n", "entry_point": "sq",
      "canonical_solution": "    return x * x\n",
      "test": "def check(candidate):\n    assert candidate(3) == 9\n    assert candidate(-4) == 16\n    assert True\n"}
SECRET = "sesame-5f0c9e2b7a41d386"  # an expected value the graded program must not be able to read
KEY = {"task_id": "t/key", "prompt": "def key(x):\n    \"\"\"The key.\"\"\"\n", "entry_point": "key",
       "canonical_solution": f"    return {SECRET!r}\n",
       "test": f"def check(candidate):\n    assert candidate(1) == {SECRET!r}\n"}

WRONG = "    return x + x\n\n\n"  # the wrong body of SQ the attacks below follow with module-level code
FIND_TOKEN = r"""import os, re, sys
_src = open(sys.argv[0] if sys.argv and sys.argv[0] else 'program.py').read()
def _forge(*_):
    for _tok in re.findall(r'[0-9a-f]{32}', _src):
        os.write(1, ('\n' + _tok + '\n').encode())
    os._exit(0)
"""

# Wrong completions of SQ that try to pass anyway. The old grader (program + asserts + a pass token on stdout) passed
# those that forge the token, re-execute under -O, skip asserts by settrace or return an always-equal object; the
# others aim at the new grading channel.
ATTACKS = {
    "print the pass token read from its own file, then os._exit(0)": WRONG + FIND_TOKEN + "_forge()\n",
    "re-execute itself under python -O (asserts stripped)": WRONG + """import os, sys
if sys.flags.optimize == 0:
    os.execv(sys.executable, [sys.executable, '-O', *sys.argv])
""",
    "re-execute itself under python -O, keeping the grading channel": WRONG + """import fcntl, os, sys
def _pipes(mode):
    fds = [int(n) for n in os.listdir('/proc/self/fd') if int(n) > 2]
    return [fd for fd in fds if os.path.exists(f'/proc/self/fd/{fd}')
            and os.readlink(f'/proc/self/fd/{fd}').startswith('pipe:')
            and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == mode]
if sys.flags.optimize == 0:
    _reads, _writes = _pipes(os.O_RDONLY), _pipes(os.O_WRONLY)
    if len(_reads) == 1 and len(_writes) == 1:
        os.dup2(_reads[0], 0)
        os.dup2(_writes[0], 1)
    os.execv(sys.executable, [sys.executable, '-O', *sys.argv])
""",
    "skip assert lines with sys.settrace": WRONG + """import linecache, sys
def _asserts(frame, number):
    return linecache.getline(frame.f_code.co_filename, number).strip().startswith('assert candidate')
def _skip(frame, event, arg):
    if event == 'line' and _asserts(frame, frame.f_lineno):
        target = frame.f_lineno + 1
        while _asserts(frame, target):
            target += 1
        frame.f_lineno = target
    return _skip
sys.settrace(_skip)
""",
    "print the token from an atexit handler after the assert failed":
        WRONG + FIND_TOKEN + "import atexit\natexit.register(_forge)\n",
    "print the token from sys.excepthook": WRONG + FIND_TOKEN + "sys.excepthook = _forge\n",
    "return an object whose __eq__ is always true": """    class _Equal:
        def __eq__(self, other):
            return True
    return _Equal()
""",
    "return an int subclass whose __eq__ is always true": """    class _Int(int):
        def __eq__(self, other):
            return True
        __hash__ = int.__hash__
    return _Int(x + x)
""",
    "write the grading protocol's messages to every descriptor": WRONG + """import os
for _fd in range(1, 64):
    try:
        os.write(_fd, b'{"ready": true}\\n{"done": true}\\n{"call": 1, "value": 16}\\n')
    except OSError:
        pass
""",
    "flood the channel with one endless line": """    import os
    for fd in range(1, 64):
        try:
            os.write(fd, b'9' * 300000)
        except OSError:
            pass
    return x + x
""",
    "exit with status 0 inside the call": "    import os\n    os._exit(0)\n",
    "raise SystemExit(0) inside the call": "    raise SystemExit(0)\n",
}

# Finds SECRET wherever the graded program can look: its own files, argv, environment, open regular files, memory.
STEAL_SECRET = """    import gc, os, re
    pattern = re.compile('sesame-' + '[0-9a-f]{16}')
    texts = [repr(o) for o in gc.get_objects() if isinstance(o, (str, bytes, dict, tuple))]
    for path in ['/proc/self/cmdline', '/proc/self/environ'] + os.listdir('.') + [
            '/proc/self/fd/' + n for n in os.listdir('/proc/self/fd')]:
        try:
            if os.path.isfile(path):
                texts.append(open(path, 'rb').read().decode('utf-8', 'replace'))
        except OSError:
            pass
    for text in texts:
        found = pattern.search(text)
        if found:
            return found.group(0)
    return ''
"""

# An MBPP problem whose asserts wrap the answer in builtins and a standard module; its attack redefines those.
HALVES = {"task_id": 11, "text": "Halve every number.", "code": "def halves(xs):\n    return [x / 2 for x in xs]",
          "test_setup_code": "", "test_list": ["assert math.isclose(sum(halves([1, 2])), 1.5)",
                                               "assert set(halves([2, 2, 4])) == {1.0, 2.0}",
                                               "assert halves([]) == []"]}
HALVES_ATTACK = ("class _Math:\n    @staticmethod\n    def isclose(a, b):\n        return True\n\n\nmath = _Math()\n\n\n"
                 "def set(items):\n    return {1.0, 2.0}\n\n\ndef halves(xs):\n    return []\n")


def _grade_sq(box: Sandbox, completion: str):
    return grade_program(box, humaneval_tests(SQ), humaneval_candidate(SQ, completion))


@pytest.mark.parametrize("which", ["sandbox", "fallback"])
def test_right_answers_pass_and_wrong_ones_fail(which, request):
    box = request.getfixturevalue(which)
    good = _grade_sq(box, SQ["canonical_solution"])
    assert good.passed and good.status == "passed" and good.calls == 2 and good.detail == ""
    wrong = _grade_sq(box, "    return x + x\n")
    assert wrong.status == "failed" and wrong.calls == 1 and "assert candidate(3) == 9" in wrong.detail
    broken = _grade_sq(box, "    return x +\n")
    assert broken.status == "failed" and broken.calls == 0 and "SyntaxError" in broken.detail
    raising = _grade_sq(box, "    return [][x]\n")
    assert raising.status == "failed" and "IndexError" in raising.detail


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("which", ["sandbox", "fallback"])
def test_attacks_on_the_verdict_fail(attack, which, request):
    grade = _grade_sq(request.getfixturevalue(which), ATTACKS[attack])
    assert not grade.passed and grade.status in ("failed", "timeout"), (attack, grade)


@pytest.mark.parametrize("which", ["sandbox", "fallback"])
def test_expected_values_never_reach_the_program(which, request):
    box = request.getfixturevalue(which)
    assert grade_program(box, humaneval_tests(KEY), humaneval_candidate(KEY, KEY["canonical_solution"])).passed
    grade = grade_program(box, humaneval_tests(KEY), humaneval_candidate(KEY, STEAL_SECRET))
    assert grade.status == "failed" and "AssertionError" in grade.detail, grade


def test_builtins_and_modules_around_the_answer_stay_the_judges(sandbox):
    tests = mbpp_tests(HALVES)
    assert tests.candidate_names == ("halves",) and tests.context == "import math\n" and not tests.problem
    assert grade_program(sandbox, tests, HALVES["code"]).passed
    grade = grade_program(sandbox, tests, HALVES_ATTACK)
    assert grade.status == "failed" and "math.isclose" in grade.detail, grade


def test_timeouts_memory_and_non_plain_answers(sandbox):
    assert _grade_sq(sandbox, "    while True:\n        pass\n").status == "timeout"
    assert _grade_sq(sandbox, "    return bytearray(2 * 1024 ** 3)\n").status == "memory"
    generator = _grade_sq(sandbox, "    return (v for v in [x * x])\n")
    assert generator.status == "failed" and "generator is not plain data" in generator.detail


def test_tolerances_loops_and_random_inputs_keep_their_meaning(sandbox):
    close = {"task_id": "t/frac", "prompt": "def frac(x):\n    \"\"\"Fractional part.\"\"\"\n", "entry_point": "frac",
             "test": "import random\n\ndef check(candidate):\n    assert abs(candidate(1.33) - 0.33) < 1e-6\n"
                     "    for _ in range(20):\n        n = random.randint(0, 100)\n"
                     "        assert abs(candidate(n + 0.5) - 0.5) < 1e-6\n"}
    grade = grade_program(sandbox, humaneval_tests(close), humaneval_candidate(close, "    return x - int(x) + 1e-9\n"))
    assert grade.passed and grade.calls == 21
    assert grade_program(sandbox, humaneval_tests(close), humaneval_candidate(close, "    return round(x % 1, 1)\n")
                         ).status == "failed"


def test_ungradable_tests_never_pass(sandbox):
    reads_a_value = {**HALVES, "test_list": ["assert halves([2]) == EXPECTED"]}
    tests = mbpp_tests(reads_a_value)
    assert tests.problem and "EXPECTED" in tests.problem
    grade = grade_program(sandbox, tests, "EXPECTED = [1.0]\n" + HALVES["code"])
    assert grade.status == "ungradable" and not grade.passed
    odd_argument = CodeTests("def f(x):\n    pass\n", "assert f(object()) is None\n", ("f",))
    grade = grade_program(sandbox, odd_argument, "def f(x):\n    return None\n")
    assert grade.status == "ungradable" and "not plain data" in grade.detail
    no_calls = CodeTests("", "assert True\n", ("f",))
    assert grade_program(sandbox, no_calls, "def f():\n    pass\n").status == "ungradable"


def test_mbpp_names_the_reference_shadows_are_the_programs():
    shadow = {"task_id": 126, "code": "def sum(a, b):\n    return a + b",
              "test_list": ["assert sum(10, 15) == 25", "assert sorted(pairs(2)) == [(0, 1)]"]}
    assert mbpp_tests(shadow).candidate_names == ("pairs", "sum")  # sorted stays the judge's builtin
    assert mbpp_tests({**shadow, "test_list": ["assert f(x) == 1"]}).problem  # x is nobody's: ungradable
    lam = mbpp_tests({**shadow, "test_list": ["assert sorted(sum(1, 2), key=lambda t: -t) == [3]"]})
    assert lam.candidate_names == ("sum",) and not lam.problem


PLAIN = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.complex_numbers(allow_nan=False),
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
    | st.frozensets(st.integers() | st.text(max_size=4), max_size=3)
    | st.sets(st.tuples(st.integers(), st.text(max_size=3)), max_size=3)
    | st.dictionaries(st.integers() | st.text(max_size=4) | st.tuples(st.integers()), inner, max_size=3),
    max_leaves=10)


def _same(a, b) -> bool:
    """Equal, with the same types all the way down."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(value=PLAIN)
def test_plain_data_round_trips_with_its_types(value):
    assert _same(decode_plain(json.loads(json.dumps(encode_plain(value)))), value)


def test_plain_data_encoding_by_value_and_refusals():
    point = namedtuple("point", "x y")
    assert encode_plain(point(1, 2)) == {"tuple": [1, 2]}
    assert encode_plain(Counter("aab")) == {"dict": [["a", 2], ["b", 1]]}
    assert encode_plain(OrderedDict(a=1)) == {"dict": [["a", 1]]}
    assert encode_plain([True, 1, 1.0, -0.0, float("nan")])[:4] == [True, 1, 1.0, -0.0]
    assert decode_plain([True, 1, 1.0]) == [True, 1, 1.0] and type(decode_plain(1.0)) is float
    for bad in (object(), b"bytes", (x for x in ()), range(3), [len]):
        with pytest.raises(TypeError, match="not plain data"):
            encode_plain(bad)
    nested: list = []
    for _ in range(150):
        nested = [nested]
    with pytest.raises(TypeError, match="deeper"):
        encode_plain(nested)
    for data in ({"tuple": 1}, {"x": []}, {"set": [[1]]}, {"dict": [[[1], 2]]}, {"dict": [[1]]}, {"complex": [1, 2]},
                 {"tuple": [], "set": []}, json.loads("[" * 150 + "]" * 150)):
        with pytest.raises(ValueError, match="plain data"):
            decode_plain(data)


def test_canonical_solutions_pass_on_real_data(shared_data, sandbox):
    he = load_humaneval(shared_data / "eval" / "humaneval.jsonl")
    mb, _ = load_mbpp(shared_data / "eval" / "mbpp.jsonl")
    # a seeded handful, plus the ones whose tests use tolerances, helpers, random inputs, the entry point by name,
    # a builtin's name, arithmetic arguments
    tricky_he = {"HumanEval/2", "HumanEval/32", "HumanEval/33", "HumanEval/38", "HumanEval/53"}
    he_pick = load_humaneval(shared_data / "eval" / "humaneval.jsonl", limit=5, seed=0) + \
        [p for p in he if p["task_id"] in tricky_he]
    mb_pick = load_mbpp(shared_data / "eval" / "mbpp.jsonl", limit=5, seed=0)[0] + \
        [p for p in mb if p["task_id"] in (126, 486)]
    items = [(humaneval_tests(p), humaneval_candidate(p, p["canonical_solution"])) for p in he_pick]
    items += [(mbpp_tests(p), p["code"]) for p in mb_pick]
    grades = grade_many(sandbox, items, workers=2)
    assert [g.status for g in grades] == ["passed"] * len(items), [(g.status, g.detail[-200:]) for g in grades]
    # MBPP 367's reference defines Node after the setup code that needs it: broken upstream, it fails here too
    broken = next(p for p in mb if p["task_id"] == 367)
    assert grade_program(sandbox, mbpp_tests(broken), broken["code"]).status == "failed"
