"""Registry auth: basic and Bearer against real registries, docker config.json credentials, token caching."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from snapshotter.errors import AuthError
from snapshotter.remote.auth import Challenge, load_docker_config, normalize_registry_host, parse_challenges
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.reference import DOCKER_HUB
from tests.support.fake_registry import FakeRegistry, sha256
from tests.support.image_builder import file, make_layer, push_image
from tests.support.registry import TestRegistry


async def _round_trip(registry: TestRegistry, client: RegistryClient, name: str) -> None:
    ref = registry.ref(name)
    pushed = await push_image(client, ref, [make_layer([file("hello", "world")], "gzip")], chunked=True)
    image = await client.resolve(ref)
    assert image.manifest_digest == pushed.manifest_digest
    layer = image.layers[0]
    assert await client.read_range(ref, layer.digest, 0, layer.size) == pushed.blobs[0]


def _docker_config(tmp_path: Path, auths: dict[str, dict[str, str]]) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": auths}))
    return str(path)


class TestBasicAuth:
    async def test_push_and_pull(self, auth_registry: TestRegistry, empty_docker_config: str) -> None:
        """With the right user and password, push, resolve and range reads work."""
        async with RegistryClient(
            credentials=auth_registry.credentials, docker_config_path=empty_docker_config
        ) as c:
            await _round_trip(auth_registry, c, "basic")

    @pytest.mark.parametrize("password", [None, "wrong-password"], ids=["anonymous", "bad-password"])
    async def test_refused(
        self, auth_registry: TestRegistry, empty_docker_config: str, password: str | None
    ) -> None:
        """Without credentials or with a wrong password: AuthError naming the image and what to do."""
        credentials = {auth_registry.host: ("lazysnap", password)} if password else {}
        ref = auth_registry.ref("refused")
        async with RegistryClient(credentials=credentials, docker_config_path=empty_docker_config) as client:
            with pytest.raises(AuthError, match=rf"{ref.repository}.*(check the user|log in)"):
                await client.resolve(ref)

    async def test_config_json_base64_auth(self, auth_registry: TestRegistry, tmp_path: Path) -> None:
        """Credentials from config.json (base64 'auth', key with scheme) are used."""
        token = base64.b64encode(f"{auth_registry.username}:{auth_registry.password}".encode()).decode()
        config = _docker_config(tmp_path, {f"http://{auth_registry.host}/v2/": {"auth": token}})
        async with RegistryClient(docker_config_path=config) as client:
            await _round_trip(auth_registry, client, "config-json")


class TestBearerAuth:
    async def test_push_and_pull(self, token_registry: TestRegistry, empty_docker_config: str) -> None:
        """The WWW-Authenticate challenge leads to a token that works for push, resolve and ranges."""
        async with RegistryClient(
            credentials=token_registry.credentials, docker_config_path=empty_docker_config
        ) as c:
            await _round_trip(token_registry, c, "bearer")

    async def test_tokens_are_cached_per_scope(
        self, token_registry: TestRegistry, empty_docker_config: str
    ) -> None:
        """Many reads of one repository cost one pull token, not one per request."""
        assert token_registry.token_server is not None
        async with RegistryClient(
            credentials=token_registry.credentials, docker_config_path=empty_docker_config
        ) as c:
            ref = token_registry.ref("cached")
            pushed = await push_image(c, ref, [make_layer([file("f", b"x" * 100_000)], "gzip")])
            before = len(token_registry.token_server.issued)
            for offset in range(0, 20):
                await c.read_range(ref, pushed.layers[0].digest, offset * 100, 100)
            await c.resolve(ref)
            issued = token_registry.token_server.issued[before:]
        assert len(issued) == 1
        assert issued[0]["access"] == [{"type": "repository", "name": ref.repository, "actions": ["pull"]}]

    @pytest.mark.parametrize("password", [None, "wrong-password"], ids=["anonymous", "bad-password"])
    async def test_refused(
        self, token_registry: TestRegistry, empty_docker_config: str, password: str | None
    ) -> None:
        """No or wrong credentials: AuthError naming the image (from the token server or the registry)."""
        credentials = {token_registry.host: ("lazysnap", password)} if password else {}
        ref = token_registry.ref("refused")
        async with RegistryClient(credentials=credentials, docker_config_path=empty_docker_config) as client:
            with pytest.raises(AuthError, match=ref.repository):
                await client.resolve(ref)

    async def test_config_json_username_password(self, token_registry: TestRegistry, tmp_path: Path) -> None:
        """Credentials from config.json (username/password fields) are used for the token request."""
        assert token_registry.username and token_registry.password
        entry = {"username": token_registry.username, "password": token_registry.password}
        config = _docker_config(tmp_path, {token_registry.host: entry})
        async with RegistryClient(docker_config_path=config) as client:
            await _round_trip(token_registry, client, "config-json-token")


class TestTokenRefresh:
    def _fake(self) -> tuple[FakeRegistry, list[str]]:
        """A fake whose token server numbers its tokens and whose registry accepts only the newest one."""
        fake = FakeRegistry()
        fake.add_blob(b"blob bytes")
        issued: list[str] = []

        async def hook(request: httpx.Request) -> httpx.Response | None:
            if request.url.host == "auth.test":
                issued.append(f"token-{len(issued) + 1}")
                return httpx.Response(200, json={"token": issued[-1], "expires_in": 60})
            if issued and request.headers.get("authorization") == f"Bearer {issued[-1]}":
                return None
            challenge = 'Bearer realm="https://auth.test/token",service="fake",scope="repository:app:pull"'
            return httpx.Response(401, headers={"WWW-Authenticate": challenge})

        fake.hook = hook
        return fake, issued

    async def test_refresh_on_401(self) -> None:
        """A token the registry stops accepting is replaced by a fresh one on the next 401."""
        fake, issued = self._fake()
        async with fake.client() as client:
            await client.fetch_blob(fake.ref(), sha256(b"blob bytes"))
            issued.append("token-revoked-by-server")  # the registry now wants a newer token than ours
            await client.fetch_blob(fake.ref(), sha256(b"blob bytes"))
        assert issued[-1] == "token-3"

    async def test_expired_token_is_renewed(self, autojump_clock: trio.testing.MockClock) -> None:
        """After expires_in, the next request asks for a new token up front instead of reusing the old one."""
        fake, issued = self._fake()
        async with fake.client() as client:
            await client.fetch_blob(fake.ref(), sha256(b"blob bytes"))
            await client.fetch_blob(fake.ref(), sha256(b"blob bytes"))
            assert issued == ["token-1"]
            await trio.sleep(120)
            unauthorized_before = sum(1 for r in fake.requests if r.url.host != "auth.test")
            await client.fetch_blob(fake.ref(), sha256(b"blob bytes"))
        assert issued == ["token-1", "token-2"]
        assert sum(1 for r in fake.requests if r.url.host != "auth.test") == unauthorized_before + 1


class TestParsing:
    def test_challenges(self) -> None:
        """Quoted and bare parameters, commas inside quotes, several challenges."""
        header = 'Bearer realm="https://auth.io/token",service="reg.io",scope="repository:a/b:pull,push", Basic realm=x'
        assert parse_challenges(header) == [
            Challenge(
                "bearer",
                {"realm": "https://auth.io/token", "service": "reg.io", "scope": "repository:a/b:pull,push"},
            ),
            Challenge("basic", {"realm": "x"}),
        ]

    @pytest.mark.parametrize(
        ("key", "host"),
        [
            ("https://index.docker.io/v1/", DOCKER_HUB),
            ("docker.io", DOCKER_HUB),
            ("http://127.0.0.1:5000", "127.0.0.1:5000"),
            ("ghcr.io", "ghcr.io"),
        ],
    )
    def test_config_keys(self, key: str, host: str) -> None:
        """config.json keys with schemes and paths map to reference hosts; Docker Hub's old key too."""
        assert normalize_registry_host(key) == host

    def test_load_docker_config(self, tmp_path: Path) -> None:
        """auth (base64) and username/password entries load; entries without credentials are skipped."""
        config = _docker_config(
            tmp_path,
            {
                "a.io": {"auth": base64.b64encode(b"u:p:with:colons").decode()},
                "b.io": {"username": "v", "password": "q"},
                "c.io": {"identitytoken": "tok"},
            },
        )
        assert load_docker_config(config) == {"a.io": ("u", "p:with:colons"), "b.io": ("v", "q")}
        assert load_docker_config(tmp_path / "missing.json") == {}

    def test_bad_docker_config(self, tmp_path: Path) -> None:
        """A config.json that is not JSON, or an auth that is not base64 'user:pass', raises AuthError."""
        (tmp_path / "bad.json").write_text("{not json")
        with pytest.raises(AuthError, match=r"bad\.json"):
            load_docker_config(tmp_path / "bad.json")
        with pytest.raises(AuthError, match=r"x\.io"):
            load_docker_config(
                _docker_config(tmp_path, {"x.io": {"auth": base64.b64encode(b"nocolon").decode()}})
            )
