"""The one place a path-like value becomes a path: models, VAEs, taggers, VLM folders, LoRA files,
datasets, runs. Every entry point sends its values through a `Resolver`:

- a request (the UI, the API, a preset saved from the UI) may name a catalog name (or another
  name the caller knows), a Hugging Face repo id, or a path that lies inside the workspace, or in
  a model folder the person running the app configured (`--model-dir`, read-only), once `..` and
  symlinks are resolved. Relative paths start at the workspace. Anything else is refused with one
  message that says nothing about whether the path exists.
- the command line (`python -m studio`, and the config files its command line names) is the
  person who owns the machine speaking: their paths may lie anywhere, and relative ones start at
  the current folder, as in kohya's scripts. They are still resolved here: made absolute (a run
  resumed from another folder finds its data) and symlinks followed; a missing folder is named
  here, a missing model or file by its loader (which also refuses pickles).

What comes out is a name, a repo id, or an absolute path, so the loaders never read a relative
path against the app's own folder (a repo id like `owner/name` is never a folder beside app.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from studio.errors import ConfigError
from studio.fileio import inside
from studio.models.catalog import HUB_ID

MAX_NAME_BYTES = 255  # one file or folder name (ext4, NTFS, APFS)
MAX_PATH_BYTES = 4096  # a whole path (Linux PATH_MAX)


@dataclass(frozen=True)
class Resolver:
    workspace: Path
    model_dirs: tuple[Path, ...] = ()
    owner: bool = False  # the command line: the person running it may name any path

    @classmethod
    def for_settings(cls, settings) -> Resolver:
        return cls(settings.workspace, tuple(settings.model_dirs))

    @classmethod
    def command_line(cls, workspace: Path, model_dirs=()) -> Resolver:
        return cls(Path(workspace).absolute(), tuple(model_dirs), owner=True)

    # -- what a value may be ------------------------------------------------------------------
    def _local(self, value: str) -> Path:
        path = Path(value).expanduser()
        if path.is_absolute():
            return path
        return Path.cwd() / path if self.owner else self.workspace / path

    def allowed(self, path: Path, roots: tuple[Path, ...] | None = None) -> bool:
        return self.owner or any(inside(path, root) for root in (roots or (self.workspace, *self.model_dirs)))

    @staticmethod
    def hub_like(value: str) -> bool:
        return (bool(HUB_ID.match(value)) and ".." not in value.split("/")
                and Path(value).suffix.lower() not in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"))

    @staticmethod
    def checked(value: str | None, what: str) -> str:
        """`value` stripped, once it could be a path on this system at all: no NUL byte, no name in
        it longer than the file system allows (the OS would refuse it with a bare OSError)."""
        value = (value or "").strip()
        if "\x00" in value:
            raise ConfigError(f"{what} {value[:80]!r} contains a NUL character; no path or name can")
        if len(value.encode()) > MAX_PATH_BYTES or any(len(part.encode()) > MAX_NAME_BYTES
                                                       for part in value.split("/")):
            raise ConfigError(f"{what} {value[:80]!r}... is too long for a path: at most {MAX_NAME_BYTES} bytes "
                              f"a name, {MAX_PATH_BYTES} in all")
        return value

    def refusal(self, what: str, value: str, hint: str) -> ConfigError:
        extra = " or a --model-dir folder" if self.model_dirs else ""
        return ConfigError(f"{what} {value!r} is not usable: {hint}. A path must lie inside the workspace "
                           f"({self.workspace}){extra}; nothing outside the workspace is read")

    # -- the kinds of value -------------------------------------------------------------------
    def model(self, value: str | None, names=(), what: str = "model") -> str:
        """A model, VAE, tagger or VLM: a known name or a repo id unchanged, a path as its resolved
        absolute path. `names`: the names that need no path (the catalog, the known taggers)."""
        value = self.checked(value, what)
        if not value or value in names:
            return value
        local = self._local(value)
        if self.allowed(local) and local.exists():
            return str(local.resolve())
        if self.hub_like(value):
            return value
        if self.owner:  # the loader says what is wrong with it (missing, a pickle, not a model)
            return str(local)
        known = f"one of {', '.join(sorted(names))}, " if names else ""
        where = f"a file or folder, e.g. in {self.workspace / 'models'}"
        raise self.refusal(what, value, f"name {known}a Hugging Face repo id (owner/name), or {where}")

    def file(self, value: str, search_dirs: list[Path], what: str) -> str:
        """A file such as a LoRA: a bare name found in one of `search_dirs`, or a path."""
        value = self.checked(value, what)
        path = Path(value).expanduser()
        if value and path.name == value:  # a bare file name: look in the usual folders first
            path = next((folder / value for folder in search_dirs if (folder / value).is_file()), None) \
                or self._local(value)
        else:
            path = self._local(value)
        if not value or not self.allowed(path):
            raise self.refusal(what, value, f"name a file in {search_dirs[0]} or give its path")
        return str(path.resolve())  # the loader names a missing file

    def folder(self, value: str | None, search_dirs: list[Path], what: str) -> Path:
        """A folder the app writes into or reads whole (a dataset, a run): inside the workspace for
        a request, anywhere on the command line. It must exist."""
        value = self.checked(value, what)
        if not value:
            raise ConfigError(f"name a {what} folder")
        path = Path(value).expanduser()
        if path.is_absolute() or self.owner:
            candidates = [self._local(value)]
        else:
            candidates = [*(folder / path for folder in search_dirs), self.workspace / path]
        for candidate in candidates:
            if not self.allowed(candidate, (self.workspace,)):
                raise self.refusal(what, value, f"name a folder in {search_dirs[0]}" if search_dirs else "")
            if candidate.is_dir():
                return candidate.resolve()
        where = f" in {search_dirs[0]}" if search_dirs and not self.owner else ""
        raise ConfigError(f"there is no {what} folder {value!r}{where}")

    def run(self, value: str | None, runs_dir: Path) -> Path:
        """A training run by its folder name in `runs_dir` (the Run lists' names): a folder there,
        symlinks not leading out, with the config.toml that every run writes first."""
        value = (value or "").strip()
        shown = value if len(value) <= 120 else value[:120] + "..."
        missing = ConfigError(f"there is no training run {shown!r} in {runs_dir}: pick one from the Run list")
        try:
            value = self.checked(value, "training run")
        except ConfigError:
            raise missing from None
        path = runs_dir / value
        if not value:
            raise missing
        if not inside(path, runs_dir):  # `..`, an absolute path, a link leading out: says nothing of existence
            raise self.refusal("run", shown, f"name a training run in {runs_dir}")
        if not (path / "config.toml").is_file():
            raise missing
        return path

    # -- whole configs --------------------------------------------------------------------------
    def train_config(self, config, catalog):
        """A TrainConfig's base model, VAE and dataset folders through the rules above."""
        datasets = [source.model_copy(update={"path": str(self.folder(source.path, [self.workspace / "datasets"],
                                                                      "dataset"))})
                    for source in config.datasets]
        return config.model_copy(update={
            "pretrained_model": self.model(config.pretrained_model, catalog, "base model"),
            "vae": self.model(config.vae, (), "VAE"),
            "datasets": datasets,
        })

    def caption_config(self, config):
        """A CaptionConfig's tagger and local VLM (an OpenAI-compatible server is not a path)."""
        from studio.captioning.run import OPENAI_PREFIX
        from studio.captioning.tagger import DEMO_TAGGER, KNOWN_TAGGERS

        nl = config.nl
        if not nl.backend.startswith(OPENAI_PREFIX) and nl.backend not in ("none", ""):
            nl = nl.model_copy(update={"backend": self.model(nl.backend, (), "NL captioner")})
        return config.model_copy(update={"tagger": self.model(config.tagger, {*KNOWN_TAGGERS, DEMO_TAGGER}, "tagger"),
                                         "nl": nl})


def model_reference(value: str | None, names, workspace: Path, what: str = "model",
                    model_dirs: tuple[Path, ...] = ()) -> str:
    """A request's model reference (see Resolver.model)."""
    return Resolver(workspace, tuple(model_dirs)).model(value, names, what)
