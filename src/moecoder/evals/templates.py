"""Named, versioned prompt templates. A template id ("instruct-md@1") is part of every cache key.

Tasks supply the substance of a prompt in two styles (`Task.prompts()["completion"|"instruction"]`);
a template decides how it is framed for the model: which style, what system message, and how an
instruction prompt is flattened to plain text for completion-only backends. Changing the wording
of a template means adding a new version, never editing an old one, so results stay comparable.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from moecoder.evals.types import Prompt, Task


class UnknownTemplate(ValueError):
    """No template with that id."""


@dataclass(frozen=True)
class Template:
    id: str  # "name@version"
    style: str  # "completion" | "instruction"
    system: str = ""
    description: str = ""
    answer: str = "code"  # how to read the answer: "code" (one module), "continuation", "files", "diff"

    def render(self, task: Task) -> Prompt:
        """The prompt for `task` under this template; `text` and `messages` are both filled."""
        base = task.prompts()[self.style]
        messages = list(base.messages) or [{"role": "user", "content": base.text}]
        if self.system:
            messages = [{"role": "system", "content": self.system}] + [m for m in messages if m["role"] != "system"]
        text = base.text if self.style == "completion" else _flatten(messages)
        return replace(base, text=text, messages=messages, template_id=self.id)


def _flatten(messages: list[dict[str, str]]) -> str:
    """A chat prompt as plain text for completion-only backends (the local model, /completions)."""
    parts = [f"### {m['role'].capitalize()}\n{m['content'].strip()}\n" for m in messages]
    return "\n".join(parts) + "\n### Assistant\n"


_MD = (
    "You are an expert Python programmer. Answer with the complete solution in a single "
    "```python fenced code block. Include the needed imports. Do not include tests or example usage."
)
_FILES = (
    "You are an expert Python programmer. Answer with every file you create or change, each as a "
    "line `### path/to/file.py` followed by a ```python fenced block holding the file's complete "
    "contents. Use relative paths. Do not include files you leave unchanged."
)
_DIFF = (
    "You are an expert software engineer fixing a bug in a repository. Answer with a single unified "
    "diff (as produced by `git diff`) in a ```diff fenced block, with paths relative to the "
    "repository root (a/... and b/...)."
)

TEMPLATES: dict[str, Template] = {
    t.id: t
    for t in [
        Template("completion@1", "completion", description="the task's code prefix; the model continues it",
                 answer="continuation"),
        Template("instruct-md@1", "instruction", _MD, "instruction; one ```python block expected"),
        Template("instruct-files@1", "instruction", _FILES, "instruction; multi-file answer, ### path + fence", "files"),
        Template("instruct-diff@1", "instruction", _DIFF, "instruction; unified diff in a ```diff block", "diff"),
    ]
}

DEFAULT_TEMPLATE = {
    "humaneval": "instruct-md@1",
    "humaneval+": "instruct-md@1",
    "mbpp": "instruct-md@1",
    "workflows": "instruct-files@1",
    "swebench-lite": "instruct-diff@1",
}


def get_template(template_id: str) -> Template:
    """Look up a template by its id, e.g. "instruct-md@1"."""
    try:
        return TEMPLATES[template_id]
    except KeyError:
        raise UnknownTemplate(f"unknown template {template_id!r}; known: {', '.join(sorted(TEMPLATES))}") from None
