"""The README against the code, read statically (nothing is run): every flag a README command or
a docstring's usage line passes is defined by its script, every --config field it sets exists in
the config it names, every repository path it mentions exists, every fec_jax name it (or
docs/official-code.md) uses is there and every call in its Python examples fits the function's
signature. A renamed flag, field or function fails here, not in a user's shell."""

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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
  README = f.read()


def blocks(language: str) -> list[str]:
  """The bodies of the README's fenced code blocks in `language`."""
  return [
      m.group(2) for m in re.finditer(r"```(\w*)\n(.*?)```", README, re.S) if m.group(1) == language
  ]


def inline_code(text: str | None = None) -> list[str]:
  """The inline code spans of `text` (default: the README), outside the fenced blocks."""
  prose = re.sub(r"```.*?```", "", README if text is None else text, flags=re.S)
  return re.findall(r"`([^`\n]+)`", prose)


def commands() -> list[list[str]]:
  """Every `python SCRIPT.py ...` or `python -m MODULE ...` command of the README (bash blocks and
  indented command lines), as tokens from `python` on, with `[--optional]` brackets removed."""
  indented = [line for line in README.splitlines() if re.match(r" {4}python ", line)]
  spans = [span for span in inline_code() if span.startswith("python ")]
  text = "\n".join(blocks("bash") + indented + spans).replace("\\\n", " ")
  found = []
  for line in text.splitlines():
    for part in re.split(r"&&|;|\||\s&\s", line):
      tokens = [t.strip("[]") for t in shlex.split(part, comments=True)]
      starts = [i for i, t in enumerate(tokens) if t in ("python", "python3")]
      if starts:
        found.append(tokens[starts[0] :])
  return found


def test_readme_bash_lines_continue_where_meant():
  """A line that starts with an option continues the line above, whose `\\` must be its last
  character: `\\` followed by a comment ends the command there (bash escapes the space)."""
  for block in blocks("bash"):
    lines = block.splitlines()
    for above, line in zip(lines, lines[1:]):
      if line.lstrip().startswith("-"):
        assert above.endswith("\\"), f"README: {above!r} does not continue to {line!r}"


def usage_commands() -> list[list[str]]:
  """The `python ...` usage lines of the module docstrings of the scripts, configs and fec_jax
  modules (an option on the next line continues the line above)."""
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
        found.append([t.strip("[]") for t in shlex.split(line, comments=True)])
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
  booleans), argparse add_argument names."""
  names = set()
  for source in command_files(path):
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
  """The README's commands and the usage lines of the docstrings."""
  checked = 0
  for tokens in commands() + usage_commands():
    path = repo_command(tokens)
    if path is None:
      continue
    assert os.path.isfile(os.path.join(ROOT, path)), f"{path} (in: {' '.join(tokens)})"
    known = defined_flags(path)
    # train.py's usage line names any field as `--config.field=value`
    flags = [
        t[2:].split("=")[0] for t in tokens if t.startswith("--") and t != "--config.field=value"
    ]
    config_file = next((t.split("=", 1)[1] for t in tokens if t.startswith("--config=")), None)
    for flag in flags:
      if flag.startswith("config."):
        assert config_file, f"--{flag} without --config= (in: {' '.join(tokens)})"
        assert has_field(
            config(config_file), flag[len("config.") :]
        ), f"--{flag}: no such field in {config_file} (in: {' '.join(tokens)})"
      else:
        assert flag in known, f"--{flag}: {path} defines no such flag (in: {' '.join(tokens)})"
      checked += 1
  assert checked > 100  # the README's commands were found


def test_readme_config_fields_exist():
  """The training config table's fields (configs/fec_small.py), the segmentation recipe's
  `field = value` settings (configs/fpn_fec_small_ade20k.py) and every inline --config.field
  (in some config; the README's own example of a misspelt field excepted)."""
  table = README.split("| field | meaning |")[1].split("\n\n")[0]
  fields = [
      f.removesuffix(".*")
      for row in table.splitlines()[2:]
      for f in re.findall(r"`([\w.*]+)`", row.split("|")[1])
  ]
  assert len(fields) > 20
  for field in fields:
    assert has_field(config("configs/fec_small.py"), field), field
  recipe = README.split("| | recipe (mmsegmentation 0.24) |")[1].split("\n\n")[0]
  settings = re.findall(r"`(\w+) = ([^`]+)`", recipe)
  assert len(settings) >= 3
  seg = config("configs/fpn_fec_small_ade20k.py")
  for field, value in settings:
    assert getattr(seg, field) == ast.literal_eval(value), f"{field} = {value}"
  misspelt = set(re.findall(r"unknown config field '([\w.]+)'", README))
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


def test_readme_paths_exist():
  mentioned = set(
      re.findall(r"(?<![\w/.])((?:configs|docs|tests|fec_jax)/[\w{},./-]*\w/?)", README)
  )
  assert len(mentioned) > 30
  for path in sorted(mentioned):
    for expanded in expand_braces(path):
      assert os.path.exists(os.path.join(ROOT, expanded)), expanded


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
  """The fec_jax names of the README and docs/official-code.md."""
  with open(os.path.join(ROOT, "docs", "official-code.md"), encoding="utf-8") as f:
    spans = inline_code() + inline_code(f.read())
  names = {m for span in spans for m in re.findall(r"\bfec_jax(?:\.\w+)+", span)}
  assert len(names) >= 40
  for name in sorted(names):
    resolve(name)  # raises where a module or attribute is missing


class ExampleCalls(ast.NodeVisitor):
  """Resolves the fec_jax (and configs) names of one README example and checks each call to one
  against its signature."""

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
      exec(compile(ast.Module(self.imports, []), "README", "exec"), namespace)
      eval(compile(ast.Expression(node), "README", "eval"), namespace)
      self.calls += 1
      return
    args = [None] * len(node.args)
    kwargs = {k.arg: None for k in node.keywords if k.arg}
    try:
      inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as e:
      raise AssertionError(f"README: {ast.unparse(node)}: {e}") from None
    self.calls += 1

  def visit_Attribute(self, node):
    name = self.dotted(node)
    if name and name.startswith("fec_jax"):
      resolve(name)
    self.generic_visit(node)


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_readme_python_examples_call_what_exists(index):
  example = blocks("python")[index]
  visitor = ExampleCalls()
  visitor.visit(ast.parse(example))
  assert visitor.calls >= 1, example
