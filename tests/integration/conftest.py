"""Fixtures for the integration tests: one test world per session, a clean identity provider per test.

`world` (session): a test CA, the identity provider, Dovecot and Postfix, all on free loopback ports in a
private temporary directory, stopped in the finaliser (also when tests fail). If the mail servers are not
installed the fixture fails (never skips) and says how to install them.

Set EMAILPROXY_WORLD_KEEP=1 to keep the world's directory (configs and logs) after the run.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.proxy import Proxy
from tests.integration.world import WorldError
from tests.integration.world.ca import CertificateFiles, make_ca
from tests.integration.world.dovecot import Dovecot, DovecotTuning
from tests.integration.world.idp import IdentityProvider
from tests.integration.world.postfix import VIRTUAL_DOMAIN, Postfix

KEEP_VARIABLE = "EMAILPROXY_WORLD_KEEP"


@dataclass
class World:
    """Everything the integration tests talk to. See the attributes and `new_user`."""

    tmp: Path  # private directory of this world (0755; holds ca/, dovecot/, postfix/)
    certs: CertificateFiles
    idp: IdentityProvider
    dovecot: Dovecot
    postfix: Postfix
    domain: str = VIRTUAL_DOMAIN

    @property
    def ca_path(self) -> Path:
        """PEM file of the test CA that signed every server certificate in the world."""
        return self.certs.ca_path

    def new_user(self, prefix: str = "user") -> str:
        """A fresh mailbox address in the delivered domain, so tests never share mailboxes."""
        return f"{prefix}-{uuid.uuid4().hex[:10]}@{self.domain}"

    def stop(self) -> None:
        """Stop everything that was started; safe to call more than once."""
        errors: list[BaseException] = []
        for stop in (self.postfix.stop, self.dovecot.stop, self.idp.stop):
            try:
                stop()
            except Exception as error:  # keep stopping the others
                errors.append(error)
        if errors:
            raise errors[0]


def start_world(tmp: Path, dovecot_tuning: DovecotTuning | None = None) -> World:
    """Build and start a world in `tmp`; on any failure stop what was started and raise.

    `dovecot_tuning` (benchmarks only) changes Dovecot's limits and token check; see DovecotTuning."""
    tmp.chmod(0o755)  # Dovecot's mail processes (uid mail) and Postfix (uid postfix) must traverse it
    certs = make_ca(tmp / "ca")
    idp = IdentityProvider(certs)
    idp.start()
    dovecot = Dovecot(tmp / "dovecot", certs, idp.check_url, dovecot_tuning)
    postfix = Postfix(tmp / "postfix", certs, dovecot.ports)
    world = World(tmp=tmp, certs=certs, idp=idp, dovecot=dovecot, postfix=postfix)
    try:
        dovecot.start()
        postfix.start()
    except BaseException:
        world.stop()
        raise
    atexit.register(world.stop)  # in case the session ends without running finalisers; stop is idempotent
    return world


@pytest.fixture(scope="session")
def world() -> Iterator[World]:
    tmp = Path(tempfile.mkdtemp(prefix="emailproxy-world-"))
    try:
        started = start_world(tmp)
    except WorldError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.fail(f"the integration test world could not start: {error}", pytrace=False)
    try:
        yield started
    finally:
        started.stop()
        if os.environ.get(KEEP_VARIABLE) != "1":
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(autouse=True)
def _fresh_identity_provider(request: pytest.FixtureRequest) -> None:
    """Before every test that uses the world, reset the identity provider (registrations, tokens, logs,
    injected failures, delays, down state)."""
    if "world" in request.fixturenames:
        current: World = request.getfixturevalue("world")
        current.idp.reset()


@pytest.fixture
def proxies() -> Iterator[list[Proxy]]:
    """Every proxy a test starts (append it); stopped at the end, each must exit 0."""
    started: list[Proxy] = []
    yield started
    codes = [proxy.stop() for proxy in started]
    assert codes == [0] * len(codes), "\n".join(proxy.output() for proxy in started)


@pytest.fixture
def idp(world: World) -> IdentityProvider:
    """The world's identity provider, freshly reset."""
    return world.idp
