"""The code extractor: fences, language tags, truncated answers, multi-file answers, templates."""

from __future__ import annotations

import pytest

from moecoder.evals.extract import UnsafePath, extract_code, extract_files, fenced_blocks, truncate_at_stop
from moecoder.evals.templates import TEMPLATES, UnknownTemplate, get_template
from moecoder.evals.types import Prompt


def test_prefers_python_tagged_blocks_over_others():
    text = "Run:\n```bash\npip install x\n```\nCode:\n```\nx = 1\n```\n```python\ndef f():\n    return 1\n```\n"
    assert extract_code(text) == "def f():\n    return 1\n"


def test_untagged_block_used_when_no_python_tag():
    assert extract_code("```\ny = 2\n```") == "y = 2\n"


def test_entry_point_then_longest():
    text = ("```python\nimport math\n\n\nprint(f(3))  # example usage, longer than the solution........\n```\n"
            "```py\ndef f(x):\n    return x\n```\n")
    assert extract_code(text, entry_point="f") == "def f(x):\n    return x\n"
    assert extract_code(text).startswith("import math")  # no entry point: the longest block


def test_unterminated_fence_runs_to_the_end():
    assert extract_code("```python\ndef g():\n    return 2") == "def g():\n    return 2\n"


def test_tildes_and_longer_fences():
    text = "~~~python\na = 1\n~~~\n````python\nb = '```'\n````\n"
    blocks = fenced_blocks(text)
    assert [b.code for b in blocks] == ["a = 1\n", "b = '```'\n"]


def test_bare_code_only_when_it_parses():
    assert extract_code("def h():\n    return 3\n") == "def h():\n    return 3\n"
    assert extract_code("Sorry, I can't do that.") is None
    assert extract_code("```python\n\n```") is None
    assert extract_code("```rust\nfn main() {}\n```") is None


def test_multi_file_format():
    text = (
        "Here is the package.\n\n### pkg/data.py\n```python\nX = 1\n```\n\n"
        "### `pkg/model.py`\n\n```python\nfrom pkg.data import X\n```\n"
        "```python\nprint('stray block without a heading is ignored')\n```\n"
        "### pkg/data.py\n```python\nX = 2\n```\n"
    )
    assert extract_files(text) == {"pkg/data.py": "X = 2\n", "pkg/model.py": "from pkg.data import X\n"}
    assert extract_files("```python\nx = 1\n```") == {}


@pytest.mark.parametrize("path", ["/etc/passwd", "../x.py", "a/../../b.py", "a//b.py", "C:/x.py", "a\\b.py"])
def test_multi_file_rejects_unsafe_paths(path):
    with pytest.raises(UnsafePath):
        extract_files(f"### {path}\n```python\nx = 1\n```\n")


def test_truncate_at_stop():
    assert truncate_at_stop("    return 1\ndef other():\n", ["\ndef ", "\nclass "]) == "    return 1"
    assert truncate_at_stop("abc", []) == "abc"


class _T:
    task_id, suite, kind = "t", "humaneval", "Code generation"

    def prompts(self):
        return {"completion": Prompt("t", "def f():\n", [], "base", stop=["\ndef "]),
                "instruction": Prompt("t", "Write f.", [{"role": "user", "content": "Write f."}], "base")}


def test_templates_render_with_ids_and_styles():
    p = get_template("instruct-md@1").render(_T())
    assert p.template_id == "instruct-md@1" and p.messages[0]["role"] == "system"
    assert p.messages[-1] == {"role": "user", "content": "Write f."}
    assert p.text.endswith("### Assistant\n") and "Write f." in p.text  # flattened for completion APIs
    c = get_template("completion@1").render(_T())
    assert c.text == "def f():\n" and c.stop == ["\ndef "]
    assert all("@" in t for t in TEMPLATES)
    with pytest.raises(UnknownTemplate, match="instruct-md@1"):
        get_template("nope@9")
