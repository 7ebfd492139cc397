"""The Hugging Face token: where it comes from, and never where it goes.

Looked up in order: a configured ``token_file``; systemd's credential
``$CREDENTIALS_DIRECTORY/hf-token`` (``LoadCredential=hf-token:...`` in the unit);
``$HF_TOKEN``. Returned as a pydantic ``SecretStr`` so a stray ``repr`` or log
line shows ``**********``, not the token. Like ssh with a private key, a configured
token file that the group or others may read or write is refused (systemd's
credentials are the service's own). A token file or credential that is there
but empty is an error, not "anonymous": read mid-rotation, it would make a
source's private repos look deleted.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from pydantic import SecretStr

from .errors import ConfigError

CREDENTIAL_NAME = "hf-token"


def unreadable(exc: BaseException) -> str:
    """Why a secret file could not be read; under systemd, a refused one (the unit's dynamic
    user owns no file in /etc) is pointed at the way a service gets its secrets."""
    why = f"cannot read it ({getattr(exc, 'strerror', None) or exc})"
    if isinstance(exc, PermissionError) and os.environ.get("INVOCATION_ID") and os.environ.get("NOTIFY_SOCKET"):
        why += ("; a systemd service's user reads a secret as a credential: LoadCredential=NAME:PATH in the unit "
                "(a drop-in), and the file /run/credentials/<unit>/NAME here")
    return why


def hub_token(token_file: Path | None = None) -> SecretStr | None:
    configured = token_file is not None
    if token_file is None and os.environ.get("CREDENTIALS_DIRECTORY"):
        credential = Path(os.environ["CREDENTIALS_DIRECTORY"]) / CREDENTIAL_NAME
        if credential.is_file():
            token_file = credential
    if token_file is not None:
        try:
            with open(token_file, "rb") as handle:
                if configured:
                    check_private(handle, token_file, f"the token file {token_file}")
                value = handle.read().decode("utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"the token file {token_file}: {unreadable(exc)}") from None
        if not value:  # a file caught mid-rotation: anonymous, private repos would look deleted
            raise ConfigError(f"the token file {token_file} is empty; it must hold the token")
        return _one_token(value, f"the token file {token_file}")
    return _one_token(os.environ.get("HF_TOKEN", "").strip(), "$HF_TOKEN")


def check_private(handle: BinaryIO, path: Path, where: str, *, quoted: bool = True) -> None:
    """Refuse a configured secret file (open as ``handle``) that the group or others may read
    or write, as ssh does a private key; ``where`` starts the message, which names ``path``
    unless not ``quoted`` (it may be a token pasted in its place). A systemd credential is the
    service's own whatever its mode bits say: systemd writes it 0400 for root and grants the
    service's user an ACL entry, which ``stat`` shows as group bits (mode 440)."""
    if _is_credential(path):
        return
    mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
    if mode & 0o077:
        raise ConfigError(f"{where} is open to other users (mode {mode:o}); it must be readable by its owner only: "
                          f"chmod 600 {path if quoted else 'it'}")


def _is_credential(path: Path) -> bool:
    """``path`` lies in this service's systemd credentials folder (``$CREDENTIALS_DIRECTORY``,
    ``/run/credentials/<unit>``), which only the service can read."""
    folder = os.environ.get("CREDENTIALS_DIRECTORY")
    return bool(folder) and os.path.realpath(path).startswith(os.path.realpath(folder) + os.sep)


def check_token_file(token_file: Path, field: str, *, readable: bool = True) -> None:
    """A configured token file must be a regular file, and (``readable``) one this user can
    read and others cannot: a token pasted in its place was taken as a relative path, stored
    in the catalog and printed by `sources list --json`; one open to others passed the config
    and failed every poll or publish after it. Errors never quote the path: it may be the token."""
    try:
        if not stat.S_ISREG(os.stat(token_file).st_mode):
            raise ConfigError(f"{field}: not a regular file")
        if readable:
            with open(token_file, "rb") as handle:
                check_private(handle, token_file, field, quoted=False)
    except FileNotFoundError:
        raise ConfigError(f"{field}: no such file (is it the token itself? give the path of a file holding it)") from None
    except OSError as exc:
        raise ConfigError(f"{field}: {unreadable(exc)}") from None


def _one_token(value: str, where: str) -> SecretStr | None:
    """A token is one printable ASCII word: anything more (a second line, a NUL) made an HTTP
    header the client refused with an error that quoted the whole header, token included,
    and a non-ASCII character an "'ascii' codec" error that did not say it was the token."""
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ConfigError(f"{where} holds more than a token (a second line, spaces or control characters); "
                          "it must hold the token alone")
    if not value.isascii():
        raise ConfigError(f"{where} holds characters other than ASCII, which no token has (a copy-paste of "
                          "typographic quotes or dashes, say)")
    return SecretStr(value) if value else None


def plain(token: SecretStr | None) -> str | bool:
    """What huggingface_hub expects: the token, or False for "anonymous, do not look elsewhere"."""
    return token.get_secret_value() if token is not None else False
