"""The README and the pages of docs/ against the code, read statically (nothing is run): every flag
a command of theirs or a docstring's usage line passes is defined by its script, every --config
field it sets exists in the config it names, an --ema of theirs is on a run that keeps EMA
weights, every repository path they mention exists, every fec_jax name they use is there, every
call in their Python examples fits the function's signature and every relative link of theirs
leads to a file and a heading that exist. A renamed flag, field, function or heading fails here,
not in a user's shell or browser."""

import ast
import functools
import importlib
import inspect
import itertools
import os
import re
import shlex
import types

import pytest

from fec_jax import create_model
from fec_jax.cli import _flag_argument as option  # --name=value or --name value; None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_docs() -> dict[str, str]:
  """README.md and every docs/*.md page, by path relative to the repository root."""
  paths = ["README.md"] + sorted(
      f"docs/{n}" for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith(".md")
  )
  docs = {}
  for path in paths:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
      docs[path] = f.read()
  return docs


DOCS = read_docs()


def blocks(language: str, text: str | None = None) -> list[str]:
  """The bodies of the fenced code blocks in `language` of `text` (default: every page)."""
  texts = DOCS.values() if text is None else [text]
  return [
      m.group(2)
      for t in texts
      for m in re.finditer(r"```(\w*)\n(.*?)```", t, re.S)
      if m.group(1) == language
  ]


def prose(text: str) -> str:
  """`text` without its fenced code blocks."""
  return re.sub(r"```.*?```", "", text, flags=re.S)


def inline_code(text: str | None = None) -> list[str]:
  """The inline code spans of `text` (default: every page), outside the fenced blocks; a span
  wrapped onto the next line is one span, its line break a space (as markdown renders it)."""
  texts = DOCS.values() if text is None else [text]
  spans = [span for t in texts for span in re.findall(r"`([^`]+)`", prose(t))]
  return [re.sub(r"\s*\n\s*", " ", span) for span in spans]


def table(header: str) -> str:
  """The rows below the table header line `header`, from the one page that holds it."""
  holders = [path for path, text in DOCS.items() if header in text]
  assert len(holders) == 1, f"{header!r} in {holders or 'no page'}"
  return DOCS[holders[0]].split(header)[1].split("\n\n")[0]


def commands() -> list[tuple[str, list[str]]]:
  """Every `python SCRIPT.py ...` or `python -m MODULE ...` command of every page (bash blocks
  and indented command lines), with its page, as tokens from `python` on, with `[--optional]`
  brackets removed; a comment of `[--optional]` options alone (`# [--step=N]`) is options of its
  command."""
  found = []
  for path, doc in DOCS.items():
    indented = [line for line in doc.splitlines() if re.match(r" {4}python ", line)]
    spans = [span for span in inline_code(doc) if span.startswith("python ")]
    text = "\n".join(blocks("bash", doc) + indented + spans).replace("\\\n", " ")
    text = re.sub(r"#((?:\s*\[--[^\]\s]+\])+)\s*$", r"\1", text, flags=re.M)
    for line in text.splitlines():
      for part in re.split(r"&&|;|\||\s&\s", line):
        tokens = [t.strip("[]") for t in shlex.split(part, comments=True)]
        starts = [i for i, t in enumerate(tokens) if t in ("python", "python3")]
        if starts:
          found.append((path, tokens[starts[0] :]))
  return found


def test_inline_code_reads_a_span_wrapped_onto_the_next_line():
  """The checks below see a span that a wrapped paragraph breaks (`python eval.py` on one line,
  `--workdir=DIR` on the next) whole, and the spans after it as spans, not the prose between."""
  text = "Run `python eval.py\n  --workdir=DIR` here, then `--ema` and `--step=N`.\n"
  assert inline_code(text) == ["python eval.py --workdir=DIR", "--ema", "--step=N"]


def test_docs_bash_lines_continue_where_meant():
  """A line that starts with an option continues the line above, whose `\\` must be its last
  character: `\\` followed by a comment ends the command there (bash escapes the space)."""
  for path, doc in DOCS.items():
    for block in blocks("bash", doc):
      lines = block.splitlines()
      for above, line in zip(lines, lines[1:]):
        if line.lstrip().startswith("-"):
          assert above.endswith("\\"), f"{path}: {above!r} does not continue to {line!r}"


def usage_commands() -> list[tuple[str, list[str]]]:
  """The `python ...` usage lines of the module docstrings of the scripts, configs and fec_jax
  modules, with their file (an option on the next line continues the line above)."""
  paths = [p for p in os.listdir(ROOT) if p.endswith(".py")]
  for folder in ("configs", "fec_jax"):
    for directory, _, files in os.walk(os.path.join(ROOT, folder)):
      paths += [
          os.path.relpath(os.path.join(directory, f), ROOT) for f in files if f.endswith(".py")
      ]
  found = []
  for path in sorted(paths):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
      docstring = ast.get_docstring(ast.parse(f.read())) or ""
    text = re.sub(r"\\?\n\s*(?=\[?--)", " ", docstring)
    for line in text.splitlines():
      if line.strip().startswith("python "):
        found.append((path, [t.strip("[]") for t in shlex.split(line, comments=True)]))
  return found


def repo_command(tokens: list[str]) -> str | None:
  """The file of the repository that a command runs (None for pip, venv, pytest)."""
  if tokens[1] == "-m":
    path = tokens[2].replace(".", "/") + ".py"
    return path if tokens[2].startswith("fec_jax") else None
  return tokens[1]


def command_files(path: str) -> list[str]:
  """The sources that define a command's flags: the script and the fec_jax module whose main it
  calls (convert_torch_weights.py and visualize.py are thin wrappers)."""
  with open(os.path.join(ROOT, path), encoding="utf-8") as f:
    source = f.read()
  wrapped = re.findall(r"^from (fec_jax[\w.]*) import main$", source, re.M)
  return [source] + [command_files(m.replace(".", "/") + ".py")[0] for m in wrapped]


def defined_flags(path: str) -> set[str]:
  """The flags a command accepts: absl DEFINE_* and config files (with absl's --noflag for
  booleans), argparse add_argument names, and --help where absl's app.run (cli.run) or an
  argparse parser (cli.ArgumentParser) reads the command line: both define it."""
  names = set()
  for source in command_files(path):
    if re.search(r"\b(?:app|cli)\.run\(|ArgumentParser\(", source):
      names.add("help")
    for kind, name in re.findall(
        r"(?:flags\.DEFINE_(\w+)|define_config_file)\(\s*\"(\w+)\"", source
    ):
      names |= {name, "no" + name} if kind == "bool" else {name}
    for call in re.findall(r"add_argument\(([^)]*)\)", source):
      names |= {n[2:] for n in re.findall(r"\"(--[\w-]+)\"", call)}
  return names


@functools.cache
def config(path: str):
  return importlib.import_module(path.removesuffix(".py").replace("/", ".")).get_config()


def has_field(cfg, field: str) -> bool:
  for part in field.split("."):
    if not hasattr(cfg, "keys") or part not in cfg.keys():
      return False
    cfg = cfg[part]
  return True


def test_commands_use_defined_flags_and_config_fields():
  """The commands of the README and docs/ and the usage lines of the docstrings."""
  checked = 0
  for source, tokens in commands() + usage_commands():
    path = repo_command(tokens)
    if path is None:
      continue
    where = f"{source}: {' '.join(tokens)}"
    assert os.path.isfile(os.path.join(ROOT, path)), f"{path} (in {where})"
    known = defined_flags(path)
    # train.py's usage line names any field as `--config.field=value`
    flags = [
        t[2:].split("=")[0] for t in tokens if t.startswith("--") and t != "--config.field=value"
    ]
    config_file = next((t.split("=", 1)[1] for t in tokens if t.startswith("--config=")), None)
    for flag in flags:
      if flag.startswith("config."):
        assert config_file, f"--{flag} without --config= (in {where})"
        assert has_field(
            config(config_file), flag[len("config.") :]
        ), f"--{flag}: no such field in {config_file} (in {where})"
      else:
        assert flag in known, f"--{flag}: {path} defines no such flag (in {where})"
      checked += 1
  assert checked > 200  # the commands were found


def test_docs_ema_options_on_runs_that_keep_ema():
  """A command of the pages with --ema (or --config.init_from_ema) on a workdir that a train.py
  command of the pages trains: that run's config keeps EMA weights (ema_decay > 0), or the
  command is an error (the segmentation configs, configs/finetune.py keep none)."""
  trained = {}  # workdir -> the train.py command's ema_decay
  for _, tokens in commands():
    if repo_command(tokens) == "train.py" and option(tokens, "config"):
      decay = option(tokens, "config.ema_decay")
      trained[option(tokens, "workdir")] = (
          float(decay) if decay is not None else config(option(tokens, "config")).ema_decay
      )
  assert len(trained) > 5
  checked = 0
  for path, tokens in commands():
    if "--ema" in tokens:
      run = next(filter(None, (option(tokens, n) for n in ("workdir", "checkpoint", "input"))), "")
    elif option(tokens, "config.init_from_ema") in ("True", "true"):
      run = option(tokens, "config.init_from")
    else:
      continue
    if run in trained:
      assert trained[run] > 0, f"{path}: {' '.join(tokens)}: {run} keeps no EMA (ema_decay 0)"
      checked += 1
  assert checked >= 1  # the demo's eval.py --ema


def test_docs_config_fields_exist():
  """The training config table's fields (configs/fec_small.py), the segmentation recipe's
  `field = value` settings (configs/fpn_fec_small_ade20k.py) and every inline --config.field
  (in some config; the README's own example of a misspelt field excepted)."""
  fields = [
      f.removesuffix(".*")
      for row in table("| field | meaning |").splitlines()[2:]
      for f in re.findall(r"`([\w.*]+)`", row.split("|")[1])
  ]
  assert len(fields) > 20
  for field in fields:
    assert has_field(config("configs/fec_small.py"), field), field
  settings = re.findall(r"`(\w+) = ([^`]+)`", table("| | recipe (mmsegmentation 0.24) |"))
  assert len(settings) >= 3
  seg = config("configs/fpn_fec_small_ade20k.py")
  for field, value in settings:
    assert getattr(seg, field) == ast.literal_eval(value), f"{field} = {value}"
  misspelt = {m for d in DOCS.values() for m in re.findall(r"unknown config field '([\w.]+)'", d)}
  configs = [  # workdir.py has no fields of its own: it reads back a run's config
      f"configs/{n}"
      for n in sorted(os.listdir(os.path.join(ROOT, "configs")))
      if n.endswith(".py") and n != "workdir.py"
  ]
  for span in inline_code():
    for field in re.findall(r"--config\.([\w.]+)", span):
      if field not in misspelt:
        assert any(has_field(config(c), field) for c in configs), f"--config.{field}"


def expand_braces(path: str) -> list[str]:
  parts = re.split(r"\{([^}]*)\}", path)
  options = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
  return ["".join(choice) for choice in itertools.product(*options)]


def test_docs_paths_exist():
  """The repository paths the pages mention (from the repository root, as in prose and commands;
  the Markdown links are test_docs_links_resolve's)."""
  mentioned = {
      (path, m)
      for path, doc in DOCS.items()
      for m in re.findall(r"(?<![\w/.])((?:configs|docs|tests|fec_jax)/[\w{},./-]*\w/?)", doc)
  }
  assert len({m for _, m in mentioned}) > 30
  for path, mention in sorted(mentioned):
    for expanded in expand_braces(mention):
      assert os.path.exists(os.path.join(ROOT, expanded)), f"{path}: {expanded}"


def slug(heading: str) -> str:
  """GitHub's anchor of a heading: lowercase, spaces to `-`, punctuation but `-` and `_` gone."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
  """The anchors of a page's headings; a repeated heading gets `-1`, `-2`, ... as on GitHub."""
  seen = {}
  found = set()
  for heading in re.findall(r"^#{1,6} +(.+?) *#*$", prose(text), re.M):
    base = slug(heading)
    anchor = base if base not in seen else f"{base}-{seen[base]}"
    seen[base] = seen.get(base, 0) + 1
    found.add(anchor)
  return found


def links(text: str) -> list[str]:
  """The targets of a page's Markdown links and images, outside code."""
  text = re.sub(r"`[^`\n]+`", "", prose(text))
  return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)


def test_anchors_follow_github():
  text = (
      "# fec-jax\n## Data: the `config`\n```\n# a comment\n```\n### Data: the config\n## Sec. 5.2\n"
  )
  assert anchors(text) == {"fec-jax", "data-the-config", "data-the-config-1", "sec-52"}


def test_docs_links_resolve():
  """Every relative link and image of the README and docs/ names a file that exists, and its
  `#anchor` a heading of that file."""
  checked = 0
  for path, doc in DOCS.items():
    for target in links(doc):
      if re.match(r"[a-z]+:", target):  # https:, mailto:
        continue
      file, _, anchor = target.partition("#")
      resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
      assert os.path.exists(os.path.join(ROOT, resolved)), f"{path}: ({target}): no {resolved}"
      if anchor:
        assert resolved.endswith(".md"), f"{path}: ({target}): an anchor into a non-page"
        with open(os.path.join(ROOT, resolved), encoding="utf-8") as f:
          known = anchors(f.read())
        assert anchor in known, f"{path}: ({target}): no heading #{anchor} in {resolved}"
      checked += 1
  assert checked > 30  # the links were found


def resolve(dotted: str):
  """fec_jax.a.b.c: the object, importing submodules on the way."""
  parts = dotted.split(".")
  obj = importlib.import_module(parts[0])
  for i, part in enumerate(parts[1:], 2):
    if not hasattr(obj, part):
      obj = importlib.import_module(".".join(parts[:i]))
    else:
      obj = getattr(obj, part)
  return obj


def test_docs_name_fec_jax_things_that_exist():
  """The fec_jax names of the README and docs/ (docs/official-code.md included)."""
  names = {m for span in inline_code() for m in re.findall(r"\bfec_jax(?:\.\w+)+", span)}
  assert len(names) >= 40
  for name in sorted(names):
    resolve(name)  # raises where a module or attribute is missing


class ExampleCalls(ast.NodeVisitor):
  """Resolves the fec_jax (and configs) names of one example of the README or docs/ and checks
  each call to one against its signature."""

  def __init__(self):
    # local name -> dotted module or object path; `fec_jax` for the one-line examples that go on
    # from the one before
    self.aliases = {"fec_jax": "fec_jax"}
    self.imports = []
    self.calls = 0

  def visit_Import(self, node):
    self.imports.append(node)
    for a in node.names:
      self.aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]

  def visit_ImportFrom(self, node):
    self.imports.append(node)
    for a in node.names:
      self.aliases[a.asname or a.name] = f"{node.module}.{a.name}"

  def dotted(self, node) -> str | None:
    if isinstance(node, ast.Name):
      return self.aliases.get(node.id)
    if isinstance(node, ast.Attribute):
      base = self.dotted(node.value)
      return base and f"{base}.{node.attr}"
    return None

  def visit_Call(self, node):
    self.generic_visit(node)
    name = self.dotted(node.func)
    if name is None or not name.startswith(("fec_jax", "configs")):
      return
    fn = resolve(name)
    if isinstance(fn, types.ModuleType):
      return
    if fn is create_model:  # options are checked by the call, which only builds the module
      namespace = {"fec_jax": importlib.import_module("fec_jax")}
      exec(compile(ast.Module(self.imports, []), "<example>", "exec"), namespace)
      eval(compile(ast.Expression(node), "<example>", "eval"), namespace)
      self.calls += 1
      return
    args = [None] * len(node.args)
    kwargs = {k.arg: None for k in node.keywords if k.arg}
    try:
      inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as e:
      raise AssertionError(f"{ast.unparse(node)}: {e}") from None
    self.calls += 1

  def visit_Attribute(self, node):
    name = self.dotted(node)
    if name and name.startswith("fec_jax"):
      resolve(name)
    self.generic_visit(node)


EXAMPLES = [
    pytest.param(example, id=f"{path}-{i}")
    for path, doc in DOCS.items()
    for i, example in enumerate(blocks("python", doc))
]


@pytest.mark.parametrize("example", EXAMPLES)
def test_docs_python_examples_call_what_exists(example):
  visitor = ExampleCalls()
  visitor.visit(ast.parse(example))
  assert visitor.calls >= 1, example
