"""What a Hub source's ``repos`` entry names: one adapter of a repo, at its top or in a
subfolder, on a branch. Its own module, free of the Hub client: `status` and the runner
read the catalog's locators through it."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple


class RepoSpec(NamedTuple):
    """One adapter a Hub source polls: ``OWNER/NAME[/SUBFOLDER][@BRANCH]``, the locator the
    catalog records it under. An adapter in a subfolder (one repo holding several tasks'
    LoRAs, or a Trainer's ``checkpoint-500/``) is named by its folder."""

    repo_id: str
    subfolder: str | None = None
    branch: str | None = None

    @classmethod
    def parse(cls, spec: str) -> RepoSpec:
        """Split ``spec`` (a trailing slash dropped); :meth:`problem` says whether it can be polled."""
        path, at, branch = spec.partition("@")
        owner, _, rest = path.partition("/")
        name, _, subfolder = rest.partition("/")
        return cls(f"{owner}/{name}", subfolder.rstrip("/") or None, branch if at else None)

    @property
    def locator(self) -> str:
        return (self.repo_id + (f"/{self.subfolder}" if self.subfolder else "")
                + (f"@{self.branch}" if self.branch is not None else ""))

    def problem(self) -> str | None:
        """Why this names nothing to poll, or None."""
        from .hub import bad_repo_id, unsafe_path  # the Hub client: not for `status`, which reads locators

        if bad_repo_id(self.repo_id) or (self.branch is not None and not self.branch.strip()):  # "acme/x@" polled no branch
            return "is not a repo id (OWNER/NAME[/SUBFOLDER][@BRANCH])"
        if self.subfolder and unsafe_path(self.subfolder):
            return "names no subfolder a repo can hold"
        return None

    @property
    def key(self) -> tuple[str, str | None, str]:
        """What names one adapter however it is spelt: repo ids ignore case (folders and
        branches do not), and no branch is main, as for :meth:`HubSettings.watches`."""
        return self.repo_id.casefold(), self.subfolder, self.branch or "main"

    def url(self, revision: str) -> str:
        """The adapter's folder at ``revision``, as ``huggingface_hub``'s ``HfFileSystem`` names it."""
        return f"hf://{self.repo_id}@{revision}" + (f"/{self.subfolder}" if self.subfolder else "")

    def file(self, name: str) -> str:
        """The path in the repo of the adapter's file ``name``."""
        return f"{self.subfolder}/{name}" if self.subfolder else name

    def files_in(self, snapshot: Path) -> Path:
        """The adapter's folder in ``snapshot``, a commit's folder."""
        return snapshot / self.subfolder if self.subfolder else snapshot
