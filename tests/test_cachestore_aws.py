"""``--cache-store aws:...``: the AWS Secrets Manager token cache, against moto's in-process AWS."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from emailproxy.cachestore import (
    AwsSecretStore,
    CacheStoreError,
    merge_account,
    open_token_store,
    parse_aws_spec,
)
from emailproxy.cli import main
from emailproxy.config import ConfigError, load_config
from emailproxy.configwrite import ConfigFileStore

REGION = "eu-west-1"
NAME = "emailproxy/tokens"

CONFIG = """[IMAP-1993]
server_address = imap.example.com
server_port = 993

[user@example.com]
permission_url = https://login.example.com/authorize
token_url = https://login.example.com/token
oauth2_scope = https://mail.example.com/.default
redirect_uri = http://localhost
client_id = the-client
client_secret = the-secret
access_token = stale-in-config
"""


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Isolated AWS settings: no real profile, no instance metadata, a fixed region."""
    empty = tmp_path / "aws-empty"
    empty.write_text("")
    for name in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
        "AWS_REGION",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


@pytest.fixture
def aws(aws_env: None) -> Iterator[Any]:
    with mock_aws():
        yield boto3.client("secretsmanager", region_name=REGION)


def secret_json(client: Any, secret_id: str = NAME) -> Any:
    return json.loads(client.get_secret_value(SecretId=secret_id)["SecretString"])


# ------------------------------------------------------------------------------------------ specs


def test_spec_parsing() -> None:
    assert parse_aws_spec("aws:tokens").secret_id == "tokens"
    assert parse_aws_spec("aws:tokens").profile is None
    spec = parse_aws_spec("aws:work||team/tokens")
    assert (spec.profile, spec.secret_id, spec.is_arn) == ("work", "team/tokens", False)
    arn = "arn:aws:secretsmanager:ap-south-1:123456789012:secret:tokens-AbCdEf"
    spec = parse_aws_spec(f"aws:prod||{arn}")
    assert (spec.profile, spec.secret_id, spec.is_arn, spec.region) == ("prod", arn, True, "ap-south-1")
    assert parse_aws_spec("aws:tokens").region is None
    for bad in ("aws:", "aws:  ", "aws:||name", "aws:profile||", "tokens", "aws:a//b", "aws:name/"):
        with pytest.raises(CacheStoreError):
            parse_aws_spec(bad)


def test_open_token_store_picks_the_backend(tmp_path: Path) -> None:
    config = tmp_path / "emailproxy.config"
    assert isinstance(open_token_store("aws:p||n", config), AwsSecretStore)
    file_store = open_token_store(str(tmp_path / "tokens.cache"), config)
    assert isinstance(file_store, ConfigFileStore) and file_store.path == tmp_path / "tokens.cache"
    default = open_token_store(None, config)
    assert isinstance(default, ConfigFileStore) and default.path == config


def test_merge_touches_only_one_account() -> None:
    data = {"a@x": {"access_token": "A", "token_salt": "s"}, "b@x": {"access_token": "B"}}
    merged = merge_account(data, "a@x", {"access_token": "A2", "token_salt": None, "refresh_token": "R"})
    assert merged == {"a@x": {"access_token": "A2", "refresh_token": "R"}, "b@x": {"access_token": "B"}}
    assert data["a@x"] == {"access_token": "A", "token_salt": "s"}, "the input is not changed"
    assert merge_account(data, "b@x", {"access_token": None}) == {"a@x": data["a@x"]}


# ------------------------------------------------------------------------------------------ AWS


def test_round_trip_creates_the_secret(aws: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    store = AwsSecretStore(f"aws:{NAME}")
    assert store.load() == {}, "a missing secret is an empty cache"
    store.save("user@example.com", {"access_token": "tok-secret-value", "token_salt": "salt"})
    assert secret_json(aws) == {
        "user@example.com": {"access_token": "tok-secret-value", "token_salt": "salt"}
    }
    assert AwsSecretStore(f"aws:{NAME}").load() == secret_json(aws)
    store.save("user@example.com", {"access_token": "second", "token_salt": None})
    assert store.load() == {"user@example.com": {"access_token": "second"}}
    assert "tok-secret-value" not in caplog.text and "second" not in caplog.text
    assert NAME in caplog.text


def test_deleting_the_last_key_removes_the_account(aws: Any) -> None:
    aws.create_secret(Name=NAME, SecretString=json.dumps({"other@x": {"access_token": "O"}}))
    store = AwsSecretStore(f"aws:{NAME}")
    store.save("user@x", {"access_token": "U"})
    store.save("user@x", {"access_token": None, "never-there": None})
    assert secret_json(aws) == {"other@x": {"access_token": "O"}}
    before = aws.describe_secret(SecretId=NAME)["VersionIdsToStages"]
    store.save("user@x", {"access_token": None})  # nothing to change: no new version
    assert aws.describe_secret(SecretId=NAME)["VersionIdsToStages"] == before


def test_two_stores_keep_each_others_accounts(aws: Any) -> None:
    first, second = AwsSecretStore(f"aws:{NAME}"), AwsSecretStore(f"aws:{NAME}")
    first.save("a@x", {"access_token": "A"})
    second.save("b@x", {"access_token": "B"})  # second was built before the secret existed
    first.save("a@x", {"access_token": "A2"})
    assert secret_json(aws) == {"a@x": {"access_token": "A2"}, "b@x": {"access_token": "B"}}


class _Interleaving:
    """A secretsmanager client whose first put_secret_value lets another store save first."""

    def __init__(self, client: Any, before_put: Any) -> None:
        self._client = client
        self._before_put = before_put

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def put_secret_value(self, **kwargs: Any) -> Any:
        if self._before_put is not None:
            before, self._before_put = self._before_put, None
            before()
        return self._client.put_secret_value(**kwargs)


def test_concurrent_write_between_read_and_put_is_merged(aws: Any) -> None:
    aws.create_secret(Name=NAME, SecretString=json.dumps({"a@x": {"access_token": "A"}}))
    other = AwsSecretStore(f"aws:{NAME}")
    racer = AwsSecretStore(
        f"aws:{NAME}",
        client=_Interleaving(aws, lambda: other.save("b@x", {"access_token": "B"})),
    )
    racer.save("a@x", {"access_token": "A2"})  # read, then `other` writes, then this put
    assert secret_json(aws) == {"a@x": {"access_token": "A2"}, "b@x": {"access_token": "B"}}


def test_concurrent_create_is_merged(aws: Any) -> None:
    """Both stores find no secret; the second one's create fails and it merges into the first's."""
    other = AwsSecretStore(f"aws:{NAME}")

    class CreateRace(_Interleaving):
        def create_secret(self, **kwargs: Any) -> Any:
            other.save("b@x", {"access_token": "B"})
            return self._client.create_secret(**kwargs)

    AwsSecretStore(f"aws:{NAME}", client=CreateRace(aws, None)).save("a@x", {"access_token": "A"})
    assert secret_json(aws) == {"a@x": {"access_token": "A"}, "b@x": {"access_token": "B"}}


def test_arn_of_a_missing_secret_is_a_clear_error(aws: Any) -> None:
    arn = f"arn:aws:secretsmanager:{REGION}:123456789012:secret:missing-AbCdEf"
    store = AwsSecretStore(f"aws:{arn}")
    assert store.load() == {}
    with pytest.raises(CacheStoreError, match="cannot be created from an ARN"):
        store.save("a@x", {"access_token": "A"})
    assert aws.list_secrets()["SecretList"] == []


def test_existing_secret_by_arn(aws: Any) -> None:
    arn = aws.create_secret(Name=NAME)["ARN"]  # created without a value, as an administrator might
    store = AwsSecretStore(f"aws:{arn}")
    assert store.load() == {}, "a secret without a value is an empty cache"
    store.save("a@x", {"access_token": "A"})
    assert secret_json(aws, arn) == {"a@x": {"access_token": "A"}}


def test_profile_is_used(aws_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "aws-config"
    config.write_text(
        "[profile work]\nregion = ap-south-1\naws_access_key_id = k\naws_secret_access_key = s\n"
    )
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    with mock_aws():
        AwsSecretStore(f"aws:work||{NAME}").save("a@x", {"access_token": "A"})
        in_profile_region = boto3.client("secretsmanager", region_name="ap-south-1")
        assert secret_json(in_profile_region) == {"a@x": {"access_token": "A"}}
        with pytest.raises(CacheStoreError, match="profile 'nope' does not exist"):
            AwsSecretStore(f"aws:nope||{NAME}").load()


def test_bad_secret_content_is_refused_not_overwritten(aws: Any) -> None:
    aws.create_secret(Name=NAME, SecretString=json.dumps({"a@x": "not an object"}))
    store = AwsSecretStore(f"aws:{NAME}")
    with pytest.raises(CacheStoreError, match="does not hold a token cache"):
        store.load()
    with pytest.raises(CacheStoreError):
        store.save("b@x", {"access_token": "B"})
    aws.put_secret_value(SecretId=NAME, SecretString="{not json")
    with pytest.raises(CacheStoreError, match="does not hold JSON"):
        store.load()
    assert aws.get_secret_value(SecretId=NAME)["SecretString"] == "{not json"


def test_missing_credentials_are_explained(aws_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(CacheStoreError, match="no AWS credentials found") as caught:
        AwsSecretStore(f"aws:{NAME}").load()
    assert isinstance(caught.value, OSError), "TokenManager treats store failures as OSError"


def test_access_denied_is_explained(aws_env: None) -> None:
    client = boto3.client("secretsmanager", region_name=REGION)
    with Stubber(client) as stubber:
        stubber.add_client_error(
            "get_secret_value",
            service_error_code="AccessDeniedException",
            service_message="not authorized to perform secretsmanager:GetSecretValue",
        )
        with pytest.raises(
            CacheStoreError, match=r"access denied by AWS \(AccessDeniedException\)"
        ) as caught:
            AwsSecretStore(f"aws:{NAME}", client=client).load()
    assert "GetSecretValue" in str(caught.value)


def test_missing_boto3_is_explained(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # `import boto3` now raises ImportError
    with pytest.raises(CacheStoreError, match=r"pip install 'emailproxy\[aws\]'"):
        AwsSecretStore(f"aws:{NAME}").load()
    config = tmp_path / "emailproxy.config"
    config.write_text(CONFIG)
    with pytest.raises(ConfigError, match=r"needs the boto3 package.*emailproxy\[aws\]"):
        load_config(config, f"aws:{NAME}")
    assert main(["--config-file", str(config), "--cache-store", f"aws:{NAME}"]) == 2
    assert "emailproxy[aws]" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ config


def test_config_takes_cache_keys_from_the_secret(aws: Any, tmp_path: Path) -> None:
    aws.create_secret(
        Name=NAME,
        SecretString=json.dumps(
            {
                "user@example.com": {
                    "access_token": "from-aws",
                    "token_salt": "salt",
                    "client_id": "ignored",
                },
            }
        ),
    )
    config_path = tmp_path / "emailproxy.config"
    config_path.write_text(CONFIG)
    config = load_config(config_path, f"aws:{NAME}")
    account = config.find_account("user@example.com")
    assert account is not None
    assert account.cached.access_token == "from-aws" and account.cached.token_salt == "salt"
    assert account.client_id == "the-client"
    assert str(config.cache_store) == f"aws:{NAME}"
    assert any("not a token cache key" in w for w in config.warnings)
    aws.delete_secret(SecretId=NAME, ForceDeleteWithoutRecovery=True)
    config = load_config(config_path, f"aws:{NAME}")  # a missing secret: no cached tokens yet
    account = config.find_account("user@example.com")
    assert account is not None and account.cached.access_token is None
