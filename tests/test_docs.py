"""Every code block of the documentation (``docs/**/*.md`` and ``README.md``) runs, on the CPU.

One test per page, so that pytest-xdist spreads them:

- ``test_python_blocks[PAGE]``: the page's Python blocks in order, in one namespace, as a reader
  pastes them, in a scratch working directory;
- ``test_recipe_blocks[PAGE]``: its shell blocks that call a recipe, in a scratch folder that
  holds ``recipes/``, with the virtual environment's ``python`` and ``torchrun`` first on PATH;
- ``test_recipe_command_lines[PAGE]``: every recipe command line of the page, run or skipped,
  uses options that the recipe's parser defines.

Pages keep real sizes and real paths; what the test changes, the page says in hidden
``<!-- docs-test: ... -->`` comments (``skip``, ``data``, ``shrink``, ``setup``), described in
``tests/_docs_blocks.py``. ``data`` names one of :data:`DATA_SETS`, the tiny on-disk data sets
of ``tests/_fixtures_data.py``. ``DOCS_TEST_FULL_SIZE=1`` runs the pages at the sizes they show.
New pages and blocks are picked up without any change here.
"""

import os
import sys
from pathlib import Path

import pytest

from tests._docs_blocks import (
    FULL_SIZE_ENV,
    Block,
    DocsTestError,
    Page,
    check_recipe_options,
    full_size_requested,
    parse_page,
    recipe_commands,
    run_python_page,
    run_shell_block,
)
from tests._fixtures_data import make_coco_folder, make_imagenet_folder

ROOT = Path(__file__).resolve().parents[1]
SHELL_TIMEOUT_S = 600


def _imagenet(root: Path) -> str:
    # train/ and val/ ImageFolder trees of 3 classes, VOC boxes in boxes/val/ (the ILSVRC layout)
    return make_imagenet_folder(root, num_classes=3, images_per_class=2).root


def _coco(root: Path) -> str:
    # the paper's splits: train2014/, val2014/ and annotations/instances_{train,val}2014.json;
    # 8 images of which 7 are annotated, so that every image has 3 without its category
    for split in ("train2014", "val2014"):
        make_coco_folder(root, split=split, num_images=8)
    return str(root)


#: ``<!-- docs-test: data NAME PATH -->``: NAME -> writer of the tiny data set (returns its root).
DATA_SETS = {"imagenet": _imagenet, "coco": _coco}


def _pages():
    return sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _collect():
    python, shell, commands = [], [], []
    for path in _pages():
        try:
            page = parse_page(path, ROOT)
        except DocsTestError:  # reported by its page test and by test_markers_of_every_page
            python.append(_rel(path))
            continue
        if page.python_blocks or page.setup:
            python.append(page.rel)
        if page.runnable_shell_blocks():
            shell.append(page.rel)
        if any(recipe_commands(b.code) for b in page.shell_blocks):
            commands.append(page.rel)
    return python, shell, commands


PYTHON_PAGES, SHELL_PAGES, COMMAND_PAGES = _collect()


def _data_roots(page: Page, tmp_path: Path) -> dict:
    roots = {}
    for name, _, line in page.data:
        if name not in DATA_SETS:
            raise DocsTestError(f"{page.rel}, line {line}: no tiny data set {name!r}; "
                                f"tests/test_docs.py has {sorted(DATA_SETS)}")
        if name not in roots:
            roots[name] = DATA_SETS[name](tmp_path / "data" / name)
    return roots


@pytest.mark.parametrize("rel", PYTHON_PAGES)
def test_python_blocks(rel, tmp_path, monkeypatch, one_thread):
    page = parse_page(ROOT / rel, ROOT)
    roots = _data_roots(page, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # files a page writes land in the scratch folder
    monkeypatch.syspath_prepend(str(ROOT))
    namespace = run_python_page(page, roots, full_size=full_size_requested())
    assert namespace.keys() - {"__name__", "__builtins__"}  # the page did define something


def _shell_env() -> dict:
    env = dict(os.environ)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # never join the caller's process group
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, even where a GPU is present
    return env


@pytest.mark.parametrize("rel", SHELL_PAGES)
def test_recipe_blocks(rel, tmp_path):
    page = parse_page(ROOT / rel, ROOT)
    roots = _data_roots(page, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    (work / "recipes").symlink_to(ROOT / "recipes", target_is_directory=True)
    for block in page.runnable_shell_blocks():
        problems = check_recipe_options(ROOT, block)
        assert not problems, "\n".join(problems)
        code = page.prepared(block.code, roots, full_size=full_size_requested())
        run_shell_block(block, code, work, _shell_env(), SHELL_TIMEOUT_S)


@pytest.mark.parametrize("rel", COMMAND_PAGES)
def test_recipe_command_lines(rel):
    page = parse_page(ROOT / rel, ROOT)
    problems = [p for b in page.shell_blocks for p in check_recipe_options(ROOT, b)]
    assert not problems, "\n".join(problems)


def test_markers_of_every_page():
    errors = []
    for path in _pages():
        try:
            page = parse_page(path, ROOT)
        except DocsTestError as exc:
            errors.append(str(exc))
            continue
        errors += [f"{page.rel}, line {line}: unknown data set {name!r}"
                   for name, _, line in page.data if name not in DATA_SETS]
    assert not errors, "\n".join(errors)


def test_collection_finds_the_tutorials():
    # a broken collector would make every page test vanish silently
    for rel in ("README.md", "docs/index.md", "docs/concepts.md", "docs/tutorials/training-loop.md",
                "docs/tutorials/evaluate-classifier.md", "docs/tutorials/coco.md"):
        assert rel in PYTHON_PAGES
    assert "docs/tutorials/imagenet-torchrun.md" in SHELL_PAGES
    assert {"docs/tutorials/coco.md", "docs/tutorials/fgsm.md"} <= set(COMMAND_PAGES)
    skipped = [b.name for rel in PYTHON_PAGES for b in parse_page(ROOT / rel, ROOT).python_blocks
               if b.skip]
    assert len(skipped) <= 3, f"keep skipped Python blocks few: {skipped}"


# ------------------------------------------------------------------ the harness itself


def _write(tmp_path: Path, text: str, name: str = "page.md") -> Page:
    path = tmp_path / name
    path.write_text(text)
    return parse_page(path, tmp_path)


PAGE = """\
# Title

<!-- docs-test: shrink "size=256" "size=8" -->
<!-- docs-test: data imagenet /data/imagenet -->
<!-- docs-test: setup
hidden = 41
-->

```python
x = hidden + 1   # size=256
```

```text
not code
```

- a list item:

    ```py title="indented"
    y = x * 2
    root = "/data/imagenet/val"
    ```

<!-- docs-test: skip needs a GPU -->

````bash
python recipes/train.py --device cuda --data-root /data/imagenet \\
    ... --epochs 1
```not a closing fence
````

~~~bash
make test
~~~
"""


def test_parser_reads_blocks_markers_and_page_lines(tmp_path):
    page = _write(tmp_path, PAGE)
    assert [(b.lang, b.number, b.line, b.skip) for b in page.blocks] == [
        ("python", 1, 10, None), ("python", 2, 20, None),
        ("shell", 1, 27, "needs a GPU"), ("shell", 2, 33, None)]
    assert page.blocks[1].code == 'y = x * 2\nroot = "/data/imagenet/val"'
    assert page.blocks[2].code.endswith("```not a closing fence")
    assert page.setup == [(6, "hidden = 41")]
    assert page.shrink == [("size=256", "size=8", 3)] and page.data == [("imagenet", "/data/imagenet", 4)]
    assert page.runnable_shell_blocks() == []  # the recipe call is skipped, `make` is no recipe
    code = page.blocks[1].code
    assert page.prepared(code, {"imagenet": "/tmp/tiny"}).endswith('"/tmp/tiny/val"')
    assert page.prepared(page.blocks[0].code, {"imagenet": "/t"}).endswith("size=8")
    assert page.prepared(page.blocks[0].code, {"imagenet": "/t"}, full_size=True).endswith("size=256")
    ns = run_python_page(page, {"imagenet": "/tmp/tiny"})
    assert (ns["x"], ns["y"], ns["root"]) == (42, 84, "/tmp/tiny/val")


def test_a_failing_block_names_the_page_the_block_and_the_line(tmp_path):
    page = _write(tmp_path, "# T\n\n```python\nimport captum_consistency\n```\n\ntext\n\n"
                            "```python\nloss = captum_consistency.GradCamConsistencyLos\n```\n",
                  name="tutorial.md")
    with pytest.raises(DocsTestError) as info:
        run_python_page(page, {})
    message = str(info.value)
    assert message.startswith("tutorial.md, python block 2 (line 10) failed: AttributeError")
    assert "GradCamConsistencyLos" in message
    # the traceback points at the page's own line, and shows it
    assert f'File "{tmp_path / "tutorial.md"}", line 10' in message
    assert "loss = captum_consistency.GradCamConsistencyLos" in message


def test_skipped_python_blocks_are_still_compiled(tmp_path):
    page = _write(tmp_path, "```python\na = 1\n```\n<!-- docs-test: skip real data -->\n"
                            "```python\nopen('/data/x')\n```\n")
    assert run_python_page(page, {})["a"] == 1
    page = _write(tmp_path, "```python\na = 1\n```\n<!-- docs-test: skip real data -->\n"
                            "```python\nfor x in:\n```\n")
    with pytest.raises(DocsTestError, match=r"python block 2 \(line 6\) failed: SyntaxError"):
        run_python_page(page, {})


@pytest.mark.parametrize("text, message", [
    ("<!-- docs-test: skip -->\n```python\nx\n```\n", "line 1: 'skip' needs a reason"),
    ("<!-- docs-test: skip GPU -->\ntext\n```python\nx\n```\n", "line 1: 'skip' must come right"),
    ("<!-- docs-test: skip GPU -->\n```text\nx\n```\n", "'skip' before a text block"),
    ("<!-- docs-test: skip GPU -->\n```python\nx = 1\n```\n", "every Python block is skipped"),
    ("<!-- docs-test: sikp GPU -->\n```python\nx\n```\n", "unknown docs-test directive"),
    ('<!-- docs-test: shrink "n=9" "n=1" -->\n```python\nn=8\n```\n', "'shrink' text 'n=9' is in none"),
    ("<!-- docs-test: data coco /data/coco -->\n```python\nx = 1\n```\n", "'data' path '/data/coco'"),
    ("<!-- docs-test: setup\nx = 1\n", "never closed"),
    ("```python\nx = 1\n", "line 1: code block is never closed"),
])
def test_marker_mistakes_name_the_page_and_line(tmp_path, text, message):
    with pytest.raises(DocsTestError, match="^page.md") as info:
        _write(tmp_path, text)
    assert message in str(info.value)


def test_recipe_command_lines_are_checked_against_the_parser():
    code = ("for m in cmwp fullgrad; do\n"
            "  torchrun --nproc_per_node 4 recipes/evaluate.py --method $m --device tpu \\\n"
            "      --no-such-option 3 ... --output-dir runs/x; echo done\n"
            "done\n"
            "python recipes/train.py --data=imagenet --amp  # --bogus in a comment\n"
            "python recipes/nothere.py\n")
    assert recipe_commands(code) == [
        ("evaluate", ["--method", "$m", "--device", "tpu", "--no-such-option", "3", "--output-dir",
                      "runs/x"]),
        ("train", ["--data=imagenet", "--amp"]),
        ("nothere", [])]
    problems = check_recipe_options(ROOT, Block("p.md", "shell", 1, 3, code))
    assert problems == [
        "p.md, shell block 1 (line 3): --device 'tpu' of recipes/evaluate.py is not one of "
        "['cpu', 'cuda']",
        "p.md, shell block 1 (line 3): recipes/evaluate.py has no option --no-such-option",
        "p.md, shell block 1 (line 3): recipes/nothere.py does not exist"]


def test_a_failing_shell_block_names_the_page_and_the_block(tmp_path):
    block = Block("docs/x.md", "shell", 2, 40, "echo step one\nfalse\necho never")
    with pytest.raises(DocsTestError) as info:
        run_shell_block(block, block.code, tmp_path, dict(os.environ), 60)
    assert str(info.value).startswith("docs/x.md, shell block 2 (line 40) exited with status 1")
    assert "step one" in str(info.value) and "never" not in str(info.value)


def test_full_size_env_var(monkeypatch):
    monkeypatch.delenv(FULL_SIZE_ENV, raising=False)
    assert not full_size_requested()
    monkeypatch.setenv(FULL_SIZE_ENV, "1")
    assert full_size_requested()
