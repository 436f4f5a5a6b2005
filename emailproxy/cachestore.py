"""Token cache stores other than the configuration file: ``--cache-store aws:...`` (AWS Secrets Manager).

The secret's SecretString holds JSON of the reference's form, one object per account section::

    { "<account>": { "<key>": "<string>", ... }, ... }

Specs: ``aws:<secret name or ARN>`` or ``aws:<profile>||<secret name or ARN>`` (a named AWS profile). boto3 is
an optional extra (``pip install 'emailproxy[aws]'``) and is imported only when such a store is used.

A save never rewrites other accounts: it reads the current secret, changes only its own account's keys and
writes the result. Secrets Manager has no conditional write, so after each write the secret's version stages
are checked: when another writer's version landed between this store's read and its write (it is then the
``AWSPREVIOUS`` version instead of the one that was read), the merge is redone on top of that version, so
neither writer's account is lost. Secret values are never logged or put into exception messages.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from emailproxy.oauth.tokens import TokenStore

log = logging.getLogger("emailproxy")

AWS_PREFIX = "aws:"
PROFILE_SEPARATOR = "||"
INSTALL_HINT = "pip install 'emailproxy[aws]'"
MAX_ATTEMPTS = 5
_ARN_RE = re.compile(r"^arn:(?P<partition>[^:]+):secretsmanager:(?P<region>[^:]*):[^:]*:secret:.+$")

CacheData = dict[str, dict[str, str]]


class CacheStore(Protocol):
    """Holds the token cache keys of every account: ``{account section: {key: value}}``."""

    def load(self) -> CacheData: ...

    def save(self, section: str, changes: Mapping[str, str | None]) -> None: ...


class CacheStoreError(OSError):
    """The cache store cannot be used; ``str()`` says why and what to do (never holds a secret value)."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)


def is_aws_spec(spec: str | os.PathLike[str] | None) -> bool:
    return spec is not None and os.fspath(spec).startswith(AWS_PREFIX)


@dataclass(frozen=True, slots=True)
class AwsSecretSpec:
    secret_id: str  # a name or an ARN, as given
    profile: str | None = None

    @property
    def is_arn(self) -> bool:
        return self.secret_id.startswith("arn:")

    @property
    def region(self) -> str | None:
        """The region named in an ARN (the secret lives there whatever the profile's default)."""
        match = _ARN_RE.match(self.secret_id)
        return (match.group("region") or None) if match else None


def parse_aws_spec(spec: str) -> AwsSecretSpec:
    """``aws:<name or ARN>`` or ``aws:<profile>||<name or ARN>``; raises CacheStoreError when malformed."""
    if not spec.startswith(AWS_PREFIX):
        raise CacheStoreError(f"{spec!r} is not an AWS cache store", "write it as aws:<secret name or ARN>")
    rest = spec[len(AWS_PREFIX) :]
    profile: str | None = None
    if PROFILE_SEPARATOR in rest:
        profile, _, rest = rest.partition(PROFILE_SEPARATOR)
        if not profile.strip():
            raise CacheStoreError(
                f"no AWS profile before '||' in {spec!r}", "write aws:<profile>||<secret name or ARN>"
            )
        profile = profile.strip()
    secret_id = rest.strip()
    if not secret_id:
        raise CacheStoreError(
            f"no secret name or ARN in {spec!r}",
            "write aws:<secret name or ARN> or aws:<profile>||<secret name or ARN>",
        )
    if "//" in secret_id or secret_id.endswith("/"):
        # the spec also travels as a path (Config.cache_store), which would silently normalise these
        raise CacheStoreError(
            f"the secret name {secret_id!r} contains '//' or ends with '/'", "choose a simpler secret name"
        )
    return AwsSecretSpec(secret_id, profile)


def open_token_store(cache_store: str | None, config_path: Path) -> TokenStore:
    """The store tokens are saved to: the ``--cache-store`` (AWS secret or file), else the config file."""
    if cache_store and is_aws_spec(cache_store):
        return AwsSecretStore(cache_store)
    from emailproxy.configwrite import ConfigFileStore

    return ConfigFileStore(Path(cache_store) if cache_store else config_path)


# --------------------------------------------------------------------------------------------- AWS


def _import_boto3() -> Any:
    try:
        import boto3
    except ImportError:
        raise CacheStoreError(
            "--cache-store aws:... needs the boto3 package, which is not installed", f"run {INSTALL_HINT}"
        ) from None
    return boto3


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    return None


def _check_shape(data: object, where: str) -> CacheData:
    if not isinstance(data, dict) or not all(
        isinstance(name, str)
        and isinstance(values, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in values.items())
        for name, values in data.items()
    ):
        raise CacheStoreError(
            f"{where} does not hold a token cache",
            'it must be JSON of the form {"<account>": {"<key>": "<string>", ...}, ...}',
        )
    return {name: dict(values) for name, values in data.items()}


def merge_account(
    data: Mapping[str, Mapping[str, str]], section: str, changes: Mapping[str, str | None]
) -> CacheData:
    """``data`` with ``changes`` applied to ``section`` only (None deletes; an empty account is removed)."""
    merged = {name: dict(values) for name, values in data.items()}
    values = merged.setdefault(section, {})
    for key, value in changes.items():
        if value is None:
            values.pop(key, None)
        else:
            values[key] = value
    if not values:
        del merged[section]
    return merged


class AwsSecretStore:
    """A token cache in one AWS Secrets Manager secret, shared safely by several proxies."""

    def __init__(self, spec: str, *, client: Any = None, max_attempts: int = MAX_ATTEMPTS) -> None:
        self.spec = spec
        self.parsed = parse_aws_spec(spec)
        self._client = client
        self._max_attempts = max_attempts
        self._lock = threading.Lock()  # one save at a time per store object

    def __repr__(self) -> str:
        return f"AwsSecretStore({self.spec!r})"

    @property
    def where(self) -> str:
        return f"the AWS secret {self.parsed.secret_id}"

    # ---------------------------------------------------------------------------------------- client

    def client(self) -> Any:
        if self._client is None:
            boto3 = _import_boto3()
            # botocore's DEBUG lines include response bodies, i.e. the secret's content
            for name in ("botocore", "boto3"):
                library_log = logging.getLogger(name)
                if library_log.level == logging.NOTSET:
                    library_log.setLevel(logging.INFO)
            from botocore.exceptions import BotoCoreError

            try:
                session = boto3.session.Session(profile_name=self.parsed.profile)
                self._client = session.client("secretsmanager", region_name=self.parsed.region)
            except BotoCoreError as exc:
                raise self._translate(exc, "connect to") from None
        return self._client

    def _translate(self, exc: Exception, action: str) -> CacheStoreError:
        """A CacheStoreError that explains a boto3/botocore failure (AWS messages carry no secret values)."""
        from botocore import exceptions as bce

        code = _error_code(exc)
        if isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError):
            return CacheStoreError(
                f"cannot {action} {self.where}: no AWS credentials found",
                "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, configure a profile (aws:<profile>||<name>) "
                "or run on a host with an IAM role",
            )
        if isinstance(exc, bce.ProfileNotFound):
            return CacheStoreError(
                f"cannot {action} {self.where}: the AWS profile {self.parsed.profile!r} does not exist",
                "check ~/.aws/config and ~/.aws/credentials",
            )
        if isinstance(exc, bce.NoRegionError):
            return CacheStoreError(
                f"cannot {action} {self.where}: no AWS region configured",
                "set AWS_DEFAULT_REGION, give the profile a region, or use the secret's ARN",
            )
        if code in (
            "AccessDeniedException",
            "AccessDenied",
            "UnrecognizedClientException",
            "InvalidSignatureException",
            "ExpiredTokenException",
        ):
            return CacheStoreError(
                f"cannot {action} {self.where}: access denied by AWS ({code})",
                "the proxy's identity needs secretsmanager:GetSecretValue, PutSecretValue and "
                "DescribeSecret on it (and CreateSecret to create it)",
            )
        detail = f"{code}" if code else type(exc).__name__
        return CacheStoreError(f"cannot {action} {self.where}: {detail}: {exc}")

    def _call(self, action: str, method: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client(), method)(**kwargs)
        except (BotoCoreError, ClientError) as exc:
            if _error_code(exc) == "ResourceNotFoundException":
                raise _Missing from None
            raise self._translate(exc, action) from None

    # ------------------------------------------------------------------------------------------ read

    def _read(self, version_id: str | None = None) -> tuple[CacheData, str | None]:
        """The secret's content and VersionId (``({}, None)`` when the secret does not exist)."""
        kwargs: dict[str, str] = {"SecretId": self.parsed.secret_id}
        if version_id is not None:
            kwargs["VersionId"] = version_id
        try:
            response = self._call("read", "get_secret_value", **kwargs)
        except _Missing:
            return {}, None
        text = response.get("SecretString")
        if text is None:
            raise CacheStoreError(
                f"{self.where} holds binary data, not a token cache", "use a secret with a JSON SecretString"
            )
        version = response.get("VersionId")
        if not text.strip():
            return {}, version
        try:
            data = json.loads(text)
        except ValueError:
            raise CacheStoreError(
                f"{self.where} does not hold JSON", "it must hold the token cache JSON (or be empty)"
            ) from None
        return _check_shape(data, self.where), version

    def load(self) -> CacheData:
        """Every account's cache keys (empty when the secret does not exist yet)."""
        data, _version = self._read()
        return data

    # ------------------------------------------------------------------------------------------ save

    def save(self, section: str, changes: Mapping[str, str | None]) -> None:
        """Apply ``changes`` to ``section`` in the secret, keeping every other account as it is now."""
        if any(value is not None and not isinstance(value, str) for value in changes.values()):
            raise ValueError("cache values must be strings")
        with self._lock:
            base, base_version = self._read()
            rebased = False  # True when the current content is ours but lacks a version we replaced
            exists = base_version is not None  # a secret created without a value has no version
            for _attempt in range(self._max_attempts):
                merged = merge_account(base, section, changes)
                if merged == base and base_version is not None and not rebased:
                    return  # nothing to change (or our changes are already there)
                if not exists:
                    if self._create(merged):
                        log.info("Created %s for the token cache (account %s)", self.where, section)
                        return
                    base, base_version = self._read()  # created by someone else meanwhile
                    exists = True
                    continue
                try:
                    written = self._put(merged)
                    current, previous = self._stages()
                except _Missing:  # deleted meanwhile
                    base, base_version, rebased, exists = {}, None, False, False
                    continue
                if current == written and previous == base_version:
                    log.debug("Saved the cached tokens of account %s to %s", section, self.where)
                    return
                if current == written and previous is not None:
                    # another writer's version landed between our read and our write and we replaced it:
                    # merge again on top of it (it holds that writer's accounts) and write over ours
                    log.info("%s changed while saving account %s; merging again", self.where, section)
                    base, _ = self._read(previous)
                    base_version, rebased = written, True
                else:
                    # a newer version follows ours: check that our changes are in the current content
                    base, base_version = self._read()
                    rebased = False
            raise CacheStoreError(
                f"could not save account {section} to {self.where}: it kept changing while saving",
                "another proxy writes it constantly; the tokens stay in memory",
            )

    def _create(self, content: CacheData) -> bool:
        """Create the secret; False when it appeared meanwhile. Raises for an ARN (it cannot be created)."""
        if self.parsed.is_arn:
            try:  # it may exist without a value yet: then it is written, not created
                self._call("describe", "describe_secret", SecretId=self.parsed.secret_id)
                return False
            except _Missing:
                pass
            raise CacheStoreError(
                f"{self.where} does not exist, and a secret cannot be created from an ARN",
                "create the secret first, or give a secret name (aws:<name>) so the proxy creates it",
            )
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client().create_secret(
                Name=self.parsed.secret_id,
                SecretString=json.dumps(content),
                ClientRequestToken=str(uuid.uuid4()),
                Description="emailproxy token cache",
            )
        except (BotoCoreError, ClientError) as exc:
            if _error_code(exc) == "ResourceExistsException":
                return False
            raise self._translate(exc, "create") from None
        return True

    def _put(self, content: CacheData) -> str:
        response = self._call(
            "write",
            "put_secret_value",
            SecretId=self.parsed.secret_id,
            SecretString=json.dumps(content),
            ClientRequestToken=str(uuid.uuid4()),
        )
        return str(response["VersionId"])

    def _stages(self) -> tuple[str | None, str | None]:
        """The VersionIds labelled AWSCURRENT and AWSPREVIOUS."""
        response = self._call("describe", "describe_secret", SecretId=self.parsed.secret_id)
        current = previous = None
        for version, stages in (response.get("VersionIdsToStages") or {}).items():
            if "AWSCURRENT" in stages:
                current = version
            if "AWSPREVIOUS" in stages:
                previous = version
        return current, previous


class _Missing(Exception):
    """The secret does not exist (internal)."""
