"""Write-back of owned keys: in place, comment-preserving, atomic, and safe against concurrent edits."""

from __future__ import annotations

import configparser
import os
import stat
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emailproxy.config import load_config
from emailproxy.configwrite import ConfigFileStore, apply_changes

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "reference-written"
if not FIXTURES.is_dir():
    FIXTURES = Path("/work/shared/fixtures/reference-written")

ORIGINAL = """\
# Top comment: kept
; another comment style

[Documentation]
documentation = first line
    second line

    after a blank line inside the value

[IMAP-1993]
# inside the server section
server_address = outlook.office365.com
Server_Port: 993

[user@example.com]
# account comment
permission_url = https://login.example.com/authorize
token_url = https://login.example.com/token
Client_ID = abc
access_token = OLD-ACCESS
    old-continuation

    more-old-continuation
refresh_token = OLD-REFRESH
; trailing comment of the account section

# comment that introduces the next section
[other@example.com]
client_id = xyz
"""


def parsed(text: str) -> dict[str, dict[str, str]]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(text)
    return {name: dict(parser[name]) for name in parser.sections()}


def save(tmp_path: Path, text: str, section: str, changes: dict[str, str | None], newline: str = "\n") -> str:
    path = tmp_path / "emailproxy.config"
    path.write_bytes(text.replace("\n", newline).encode())
    ConfigFileStore(path).save(section, changes)
    return path.read_bytes().decode()


# ---------------------------------------------------------------------------------------- line editing


def test_replacing_keys_changes_only_their_lines(tmp_path: Path) -> None:
    result = save(tmp_path, ORIGINAL, "user@example.com", {"access_token": "NEW", "client_id": "def"})
    expected = ORIGINAL.replace("Client_ID = abc", "Client_ID = def").replace(
        "access_token = OLD-ACCESS\n    old-continuation\n\n    more-old-continuation\n",
        "access_token = NEW\n",
    )
    assert result == expected
    assert parsed(result)["user@example.com"]["access_token"] == "NEW"


def test_appending_goes_after_the_last_option_before_trailing_comments(tmp_path: Path) -> None:
    result = save(
        tmp_path, ORIGINAL, "user@example.com", {"token_salt": "SALT", "token_iterations": "1200000"}
    )
    expected = ORIGINAL.replace(
        "refresh_token = OLD-REFRESH\n",
        "refresh_token = OLD-REFRESH\ntoken_salt = SALT\ntoken_iterations = 1200000\n",
    )
    assert result == expected


def test_appending_after_a_multi_line_value_does_not_join_it(tmp_path: Path) -> None:
    result = save(tmp_path, ORIGINAL, "Documentation", {"extra": "1"})
    assert "    after a blank line inside the value\nextra = 1\n\n[IMAP-1993]" in result
    assert parsed(result)["Documentation"] == {**parsed(ORIGINAL)["Documentation"], "extra": "1"}


def test_deleting_a_key_removes_its_continuation_lines(tmp_path: Path) -> None:
    result = save(tmp_path, ORIGINAL, "user@example.com", {"access_token": None, "missing": None})
    assert result == ORIGINAL.replace(
        "access_token = OLD-ACCESS\n    old-continuation\n\n    more-old-continuation\n", ""
    )


def test_a_comment_inside_a_replaced_value_is_kept() -> None:
    text = "[s]\nkey = old\n    more\n# note about key\n    even more\nnext = 1\n"
    assert apply_changes(text, "s", {"key": "new"}) == "[s]\nkey = new\n# note about key\nnext = 1\n"
    assert apply_changes(text, "s", {"key": None}) == "[s]\n# note about key\nnext = 1\n"


def test_keys_match_case_insensitively_and_keep_their_spelling_and_delimiter(tmp_path: Path) -> None:
    result = save(tmp_path, ORIGINAL, "IMAP-1993", {"server_port": "995", "SERVER_ADDRESS": "x.example.com"})
    assert result == ORIGINAL.replace("Server_Port: 993", "Server_Port: 995").replace(
        "server_address = outlook.office365.com", "server_address = x.example.com"
    )


def test_compact_and_empty_values() -> None:
    assert (
        apply_changes("[s]\na=1\nb =\nc=\n", "s", {"a": "2", "b": "3", "c": "4"}) == "[s]\na=2\nb = 3\nc=4\n"
    )
    assert apply_changes("[s]\na = 1\n", "s", {"a": ""}) == "[s]\na = \n"


def test_indented_options_get_the_same_indentation() -> None:
    text = "[s]\n  a = 1\n    continued\n[t]\n"
    result = apply_changes(text, "s", {"b": "2"})
    assert result == "[s]\n  a = 1\n    continued\n  b = 2\n[t]\n"
    assert parsed(result)["s"] == {"a": "1\ncontinued", "b": "2"}


def test_new_section_goes_at_the_end_after_a_blank_line(tmp_path: Path) -> None:
    result = save(tmp_path, ORIGINAL, "new@example.com", {"token_salt": "S", "access_token": "A", "x": None})
    assert result == ORIGINAL + "\n[new@example.com]\ntoken_salt = S\naccess_token = A\n"
    # a file that already ends with a blank line (as the reference writes them) gets no second one
    assert apply_changes("[a]\nk = v\n\n", "b", {"k": "v"}) == "[a]\nk = v\n\n[b]\nk = v\n"
    # a file without a final line ending
    assert apply_changes("[a]\nk = v", "b", {"k": "v"}) == "[a]\nk = v\n\n[b]\nk = v\n"
    assert apply_changes("[a]\nk = v", "a", {"j": "w"}) == "[a]\nk = v\nj = w\n"
    # only deletions for a section that does not exist: nothing to do
    assert apply_changes(ORIGINAL, "nobody@example.com", {"access_token": None}) == ORIGINAL


def test_section_names_are_matched_exactly() -> None:
    result = apply_changes(ORIGINAL, "USER@example.com", {"client_id": "q"})
    assert result.startswith(ORIGINAL) and result.endswith("\n[USER@example.com]\nclient_id = q\n")


def test_crlf_file_stays_crlf(tmp_path: Path) -> None:
    result = save(
        tmp_path, ORIGINAL, "user@example.com", {"refresh_token": "R", "last_activity": "1"}, "\r\n"
    )
    assert "\n" not in result.replace("\r\n", "")
    assert "refresh_token = R\r\nlast_activity = 1\r\n" in result
    result = save(tmp_path, ORIGINAL, "brand@new.com", {"a": "b"}, "\r\n")
    assert result.endswith("xyz\r\n\r\n[brand@new.com]\r\na = b\r\n")


def test_values_with_line_breaks_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "emailproxy.config"
    path.write_text(ORIGINAL)
    store = ConfigFileStore(path)
    for bad in ("a\nb", "a\rb", " padded"):
        with pytest.raises(ValueError):
            store.save("user@example.com", {"access_token": bad})
    for key in ("", "a=b", "[x]", "k\n"):
        with pytest.raises(ValueError):
            store.save("user@example.com", {key: "v"})
    with pytest.raises(ValueError):
        store.save("bad\nsection", {"k": "v"})
    assert path.read_text() == ORIGINAL


# ---------------------------------------------------------------------------------- files and atomicity


def test_noop_save_is_byte_identical_and_does_not_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "emailproxy.config"
    path.write_bytes(ORIGINAL.encode())
    before = os.stat(path)
    ConfigFileStore(path).save("user@example.com", {"refresh_token": "OLD-REFRESH", "nothing": None})
    after = os.stat(path)
    assert path.read_bytes() == ORIGINAL.encode()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_other_bytes_survive_even_if_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "emailproxy.config"
    raw = b"\xef\xbb\xbf# caf\xe9 latin-1 comment\n[a@b.c]\nk = v\n"
    path.write_bytes(raw)
    ConfigFileStore(path).save("a@b.c", {"k": "w"})
    assert path.read_bytes() == raw.replace(b"k = v", b"k = w")


def test_missing_file_is_created_private(tmp_path: Path) -> None:
    path = tmp_path / "tokens.cache"
    ConfigFileStore(path).save("user@example.com", {"token_salt": "S", "access_token": "A"})
    assert path.read_text() == "[user@example.com]\ntoken_salt = S\naccess_token = A\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    empty = tmp_path / "empty.cache"
    empty.write_bytes(b"")
    ConfigFileStore(empty).save("a@b.c", {"k": "v"})
    assert empty.read_text() == "[a@b.c]\nk = v\n"


def test_original_mode_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "emailproxy.config"
    path.write_text(ORIGINAL)
    os.chmod(path, 0o640)
    ConfigFileStore(path).save("user@example.com", {"access_token": "N"})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_write_goes_through_a_temp_file_in_the_same_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "emailproxy.config"
    path.write_text(ORIGINAL)
    replaced: list[tuple[str, str, bytes]] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        replaced.append((str(src), str(dst), Path(src).read_bytes()))
        assert Path(dst).read_text() == ORIGINAL  # the original is untouched until the rename
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    ConfigFileStore(path).save("user@example.com", {"access_token": "N"})
    assert len(replaced) == 1
    src, dst, data = replaced[0]
    assert Path(src).parent == tmp_path and Path(dst) == path and Path(src) != path
    assert data == path.read_bytes() and b"access_token = N" in data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emailproxy.config"]


def test_failed_write_leaves_the_original_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "emailproxy.config"
    path.write_text(ORIGINAL)

    def broken(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        ConfigFileStore(path).save("user@example.com", {"access_token": "N"})
    assert path.read_text() == ORIGINAL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emailproxy.config"]


def test_symlinked_config_stays_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real.config"
    real.write_text(ORIGINAL)
    link = tmp_path / "link.config"
    link.symlink_to(real)
    ConfigFileStore(link).save("user@example.com", {"access_token": "N"})
    assert link.is_symlink()
    assert "access_token = N\n" in real.read_text()


def test_concurrent_user_edit_survives(tmp_path: Path) -> None:
    path = tmp_path / "emailproxy.config"
    path.write_text(ORIGINAL)
    config = load_config(path)
    account = config.find_account("user@example.com")
    assert account is not None
    # the user edits the file while the proxy runs
    edited = ORIGINAL.replace("Client_ID = abc", "# switched app\nClient_ID = changed-by-user")
    edited += "\n[SMTP-1587]\nserver_address = smtp.example.com\nserver_port = 587\n"
    path.write_text(edited)
    ConfigFileStore(path).save(account.section, {"access_token": "NEW", "token_salt": "SALT"})
    result = path.read_text()
    assert "# switched app\nClient_ID = changed-by-user\n" in result
    assert result.endswith("[SMTP-1587]\nserver_address = smtp.example.com\nserver_port = 587\n")
    reloaded = load_config(path)
    account = reloaded.find_account("user@example.com")
    assert account is not None
    assert (account.client_id, account.cached.access_token, account.cached.token_salt) == (
        "changed-by-user",
        "NEW",
        "SALT",
    )
    assert len(reloaded.servers) == 2


def test_saves_from_many_threads_are_all_kept(tmp_path: Path) -> None:
    path = tmp_path / "emailproxy.config"
    path.write_text(ORIGINAL)
    errors: list[BaseException] = []

    def worker(number: int) -> None:
        try:
            ConfigFileStore(path).save(f"user{number % 3}@example.com", {f"key{number}": str(number)})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    sections = parsed(path.read_text())
    assert {k: v for s in sections.values() for k, v in s.items() if k.startswith("key")} == {
        f"key{n}": str(n) for n in range(24)
    }


# ------------------------------------------------------------------------------- the reference's saves


def fill(text: str) -> str:
    for placeholder, value in {
        "LOCAL_IMAP_PORT": "21993",
        "LOCAL_SMTP_PORT": "21587",
        "SERVER_PORT_IMAP": "10993",
        "SERVER_PORT_SMTP": "10587",
        "TOKEN_URL": "https://127.0.0.1:18443/t",
        "PERMISSION_URL": "https://127.0.0.1:18443/a",
        "REDIRECT_PORT": "18080",
    }.items():
        text = text.replace(placeholder, value)
    return text


@pytest.mark.parametrize(
    ("fixture", "after"),
    [
        ("auth_code", "after-login.config"),
        ("auth_code", "after-exit.config"),
        ("ccg_encrypted_secret", "after-exit.config"),
        ("catch_all", "after-exit.config"),
        ("legacy_iterations", "after-exit.config"),
        ("ropc", "after-exit.config"),
    ],
)
def test_replaying_the_references_token_saves_gives_the_same_values(
    tmp_path: Path, fixture: str, after: str
) -> None:
    before_text = fill((FIXTURES / fixture / "before.config").read_text())
    after_text = fill((FIXTURES / fixture / after).read_text())
    before, target = parsed(before_text), parsed(after_text)
    path = tmp_path / "emailproxy.config"
    path.write_text(before_text)
    store = ConfigFileStore(path)
    for section, options in target.items():
        changes: dict[str, str | None] = {
            k: v for k, v in options.items() if before.get(section, {}).get(k) != v
        }
        changes.update({k: None for k in before.get(section, {}) if k not in options})
        if changes:
            store.save(section, changes)
    result = path.read_text()
    assert parsed(result) == target
    # every line of the hand-written file is still there, in order (comments included), except deleted keys
    touched = {k for name in before for k, v in before[name].items() if target.get(name, {}).get(k) != v}
    remaining = iter(result.splitlines())
    for line in before_text.splitlines():
        if line.split("=")[0].strip().lower() not in touched:
            assert line in remaining, line  # consumes the iterator: a subsequence check
    assert load_config(path).warnings == ()


# --------------------------------------------------------------------------------------- properties

SAMPLE_SECTIONS = ["Documentation", "IMAP-1993", "user@example.com", "other@example.com", "fresh@example.com"]
KEYS = st.sampled_from(
    ["access_token", "token_salt", "client_id", "refresh_token", "server_port", "documentation"]
)
VALUES = st.one_of(
    st.none(),
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=30).map(str.strip),
)


@settings(max_examples=150, deadline=None, database=None)
@given(section=st.sampled_from(SAMPLE_SECTIONS), changes=st.dictionaries(KEYS, VALUES, max_size=4))
def test_any_change_reads_back_as_intended(section: str, changes: dict[str, str | None]) -> None:
    for value in changes.values():  # values made only of characters str.strip() removes cannot round-trip
        if value is not None and value != value.strip():
            return
    result = apply_changes(ORIGINAL, section, changes)
    expected = parsed(ORIGINAL)
    target = expected.setdefault(section, {})
    for key, value in changes.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value
    if not target and section not in parsed(ORIGINAL):
        expected.pop(section)  # only deletions for a missing section: nothing is created
    assert parsed(result) == expected
    # lines of other sections are untouched
    for other in ("Documentation", "IMAP-1993", "other@example.com"):
        if other != section:
            block = ORIGINAL.split(f"[{other}]\n", 1)[1].split("\n[", 1)[0]
            assert block in result


def test_a_user_save_during_the_merge_is_kept(tmp_path, monkeypatch):
    """A user's save landing between our read and our rename is not overwritten: we merge again."""
    import emailproxy.configwrite as configwrite

    path = tmp_path / "emailproxy.config"
    path.write_text("[user@example.com]\nclient_id = abc\n")
    real_apply = configwrite.apply_changes
    calls = []

    def apply_while_the_user_saves(text, section, changes):
        calls.append(text)
        if len(calls) == 1:  # the user's editor saves (atomic rename) while we merge
            user = tmp_path / "edited"
            user.write_text("# the user's new comment\n[user@example.com]\nclient_id = abc\n")
            user.replace(path)
        return real_apply(text, section, changes)

    monkeypatch.setattr(configwrite, "apply_changes", apply_while_the_user_saves)
    configwrite.ConfigFileStore(path).save("user@example.com", {"access_token": "gAAAA-new"})
    assert len(calls) == 2
    assert path.read_text() == (
        "# the user's new comment\n[user@example.com]\nclient_id = abc\naccess_token = gAAAA-new\n"
    )
