"""OAuthVerifier against a real (tiny) authorization server on loopback: discovery, JWKS, rotation, refusals."""

from __future__ import annotations

import time
from typing import Any

import anyio
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm

from app.oauth import (
    InsufficientScope,
    InvalidToken,
    OAuthConfig,
    OAuthIdentity,
    OAuthVerifier,
    looks_like_jwt,
    protected_resource_metadata,
    www_authenticate,
)
from tests.conftest import (
    AUDIENCE,
    DROP,
    RSA_KEY,
    Issuer,
    IssuerState,
    b64url,
    hand_made,
    issuer_app,
    rsa_jwk,
)
from tests.servers import serve

pytestmark = pytest.mark.anyio

ROTATED_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update(kid=kid, use="sig", alg="ES256")
    return jwk


async def refused(verifier: OAuthVerifier, token: str, description: str) -> None:
    with pytest.raises(InvalidToken) as caught:
        await verifier.verify(token)
    assert str(caught.value) == description
    assert token not in repr(caught.value)
    assert caught.value.__cause__ is None  # raised `from None`: no pyjwt message (nor token) rides along


async def test_a_valid_token_yields_the_tenant_subject_scopes_and_expiry(issuer: Issuer) -> None:
    with anyio.fail_after(10):
        token = issuer.mint()
        identity = await issuer.verifier().verify(token)
    assert identity == OAuthIdentity(
        tenant_ref="acme",
        subject="user-1",
        scopes=frozenset({"images:generate", "images:read"}),
        expires_at=jwt.decode(token, options={"verify_signature": False})["exp"],
    )
    assert issuer.state.discovery_fetches == 1
    assert issuer.state.jwks_fetches == 1


async def test_the_subject_falls_back_to_client_id_and_the_tenant_claim_is_configurable(issuer: Issuer) -> None:
    with anyio.fail_after(10):
        token = issuer.mint(sub=DROP, client_id="svc-7", org="globex")
        identity = await issuer.verifier(tenant_claim="org").verify(token)
    assert (identity.tenant_ref, identity.subject) == ("globex", "svc-7")


async def test_an_expired_token_is_refused_even_with_leeway(issuer: Issuer) -> None:
    now = int(time.time())
    with anyio.fail_after(10):
        await refused(issuer.verifier(), issuer.mint(iat=now - 600, exp=now - 31), "token expired")
        assert await issuer.verifier().verify(issuer.mint(iat=now - 600, exp=now - 5))  # within the 30 s leeway


async def test_a_token_not_yet_valid_is_refused(issuer: Issuer) -> None:
    now = int(time.time())
    with anyio.fail_after(10):
        await refused(issuer.verifier(), issuer.mint(nbf=now + 120), "token not yet valid")
        await refused(issuer.verifier(), issuer.mint(iat=now + 120), "token not yet valid")


async def test_a_token_for_another_audience_is_refused(issuer: Issuer) -> None:
    with anyio.fail_after(10):
        await refused(issuer.verifier(), issuer.mint(aud="https://other.example.com/mcp"), "wrong audience")
        await refused(issuer.verifier(), issuer.mint(aud=DROP), "token lacks the aud claim")


async def test_an_audience_list_containing_ours_is_accepted(issuer: Issuer) -> None:
    with anyio.fail_after(10):
        token = issuer.mint(aud=["https://other.example.com", AUDIENCE])
        assert (await issuer.verifier().verify(token)).tenant_ref == "acme"


async def test_a_token_from_another_issuer_is_refused_and_one_trailing_slash_does_not_matter(issuer: Issuer) -> None:
    with anyio.fail_after(10):
        await refused(issuer.verifier(), issuer.mint(iss="https://evil.example.com"), "wrong issuer")
        await refused(issuer.verifier(), issuer.mint(iss=DROP), "token lacks the iss claim")
        assert await issuer.verifier().verify(issuer.mint(iss=issuer.url + "/"))
        assert await issuer.verifier(issuer=issuer.url + "/").verify(issuer.mint())


async def test_a_token_without_exp_is_refused(issuer: Issuer) -> None:
    with anyio.fail_after(10):
        await refused(issuer.verifier(), issuer.mint(exp=DROP), "token lacks the exp claim")


async def test_alg_none_is_refused_before_any_key_is_fetched(issuer: Issuer) -> None:
    token = hand_made({"alg": "none", "typ": "JWT"}, issuer.claims())
    assert token.endswith(".")
    with anyio.fail_after(10):
        await refused(issuer.verifier(), token, "token algorithm not allowed")
        await refused(
            issuer.verifier(), hand_made({"alg": "None", "kid": "k1"}, issuer.claims()), "token algorithm not allowed"
        )
    assert issuer.state.jwks_fetches == 0


async def test_hs256_signed_with_the_public_key_as_secret_is_refused(issuer: Issuer) -> None:
    public_pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    token = hand_made({"alg": "HS256", "typ": "JWT", "kid": "k1"}, issuer.claims(), sign=public_pem)
    with anyio.fail_after(10):
        await refused(issuer.verifier(), token, "token algorithm not allowed")
    assert issuer.state.jwks_fetches == 0


async def test_a_token_signed_by_another_key_with_the_same_kid_is_refused(issuer: Issuer) -> None:
    with anyio.fail_after(10):
        await refused(issuer.verifier(), issuer.mint(key=OTHER_KEY), "bad signature")


async def test_an_algorithm_the_jwk_does_not_declare_is_refused_but_an_alg_less_rsa_key_serves_ps256(
    issuer: Issuer,
) -> None:
    issuer.state.jwks = {"keys": [rsa_jwk(RSA_KEY, "k1"), rsa_jwk(ROTATED_KEY, "k2", alg=None)]}
    verifier = issuer.verifier()
    with anyio.fail_after(10):
        await refused(verifier, issuer.mint(algorithm="RS384"), "the token's algorithm does not match its key")
        assert await verifier.verify(issuer.mint(key=ROTATED_KEY, kid="k2", algorithm="PS256"))
        assert await verifier.verify(issuer.mint(key=ROTATED_KEY, kid="k2", algorithm="RS256"))
        await refused(verifier, issuer.mint(key=RSA_KEY, kid="k2", algorithm="PS256"), "bad signature")
        await refused(
            issuer.verifier(algorithms=("RS256",)), issuer.mint(algorithm="PS256"), "token algorithm not allowed"
        )


async def test_an_ec_p256_key_verifies_es256_tokens(issuer: Issuer) -> None:
    issuer.state.jwks = {"keys": [rsa_jwk(RSA_KEY, "k1"), ec_jwk(EC_KEY, "ec1")]}
    with anyio.fail_after(10):
        identity = await issuer.verifier().verify(issuer.mint(key=EC_KEY, kid="ec1", algorithm="ES256"))
        await refused(
            issuer.verifier(), issuer.mint(key=RSA_KEY, kid="ec1"), "the token's algorithm does not match its key"
        )
    assert identity.subject == "user-1"


async def test_a_token_without_kid_uses_the_only_signing_key_and_is_refused_when_there_are_several(
    issuer: Issuer,
) -> None:
    with anyio.fail_after(10):
        assert await issuer.verifier().verify(issuer.mint(kid=None))
        issuer.state.jwks = {"keys": [rsa_jwk(RSA_KEY, "k1"), rsa_jwk(ROTATED_KEY, "k2")]}
        await refused(issuer.verifier(), issuer.mint(kid=None), "token has no key id")


async def test_encryption_keys_are_not_used_for_signatures(issuer: Issuer) -> None:
    encryption_only = rsa_jwk(RSA_KEY, "k1")
    encryption_only["use"] = "enc"
    issuer.state.jwks = {"keys": [encryption_only, rsa_jwk(ROTATED_KEY, "k2")]}
    with anyio.fail_after(10):
        await refused(issuer.verifier(), issuer.mint(), "unknown signing key")
        assert await issuer.verifier().verify(issuer.mint(key=ROTATED_KEY, kid=None))  # the only *signing* key


async def test_an_unknown_kid_triggers_one_refetch_and_the_rotated_key_then_works(issuer: Issuer) -> None:
    verifier = issuer.verifier()
    with anyio.fail_after(10):
        assert await verifier.verify(issuer.mint())
        assert issuer.state.jwks_fetches == 1
        issuer.state.jwks = {"keys": [rsa_jwk(ROTATED_KEY, "k2")]}
        rotated = issuer.mint(key=ROTATED_KEY, kid="k2")
        assert (await verifier.verify(rotated)).tenant_ref == "acme"
        assert issuer.state.jwks_fetches == 2
        assert await verifier.verify(rotated)
        await refused(verifier, issuer.mint(), "unknown signing key")  # k1 was rotated out; no refetch yet
    assert issuer.state.jwks_fetches == 2
    assert issuer.state.discovery_fetches == 1


async def test_garbage_kids_cause_at_most_one_refetch_per_window(issuer: Issuer) -> None:
    verifier = issuer.verifier()
    with anyio.fail_after(10):
        assert await verifier.verify(issuer.mint())
        for number in range(10):
            await refused(verifier, issuer.mint(kid=f"garbage-{number}"), "unknown signing key")
        assert issuer.state.jwks_fetches == 2  # the first load and one refetch for the whole 30 s window
        assert await verifier.verify(issuer.mint())

        unthrottled = issuer.verifier(min_refetch_interval_s=0.0)  # the window is what holds the refetches back
        assert await unthrottled.verify(issuer.mint())
        for number in range(3):
            await refused(unthrottled, issuer.mint(kid=f"garbage-{number}"), "unknown signing key")
    assert issuer.state.jwks_fetches == 2 + 1 + 3


async def test_concurrent_verifications_share_one_fetch(issuer: Issuer) -> None:
    verifier = issuer.verifier()
    identities: list[OAuthIdentity] = []

    async def verify(token: str) -> None:
        identities.append(await verifier.verify(token))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            for number in range(20):
                group.start_soon(verify, issuer.mint(sub=f"user-{number}"))
    assert len(identities) == 20
    assert (issuer.state.discovery_fetches, issuer.state.jwks_fetches) == (1, 1)


async def test_a_token_without_the_tenant_claim_is_refused(issuer: Issuer) -> None:
    with anyio.fail_after(10):
        await refused(issuer.verifier(), issuer.mint(tenant=DROP), "token lacks the tenant claim")
        await refused(issuer.verifier(), issuer.mint(tenant=42), "token lacks the tenant claim")
        await refused(issuer.verifier(), issuer.mint(tenant=""), "token lacks the tenant claim")


async def test_a_token_without_the_required_scope_raises_insufficient_scope(issuer: Issuer) -> None:
    with anyio.fail_after(10), pytest.raises(InsufficientScope) as caught:
        await issuer.verifier().verify(issuer.mint(scope="images:read"))
    assert caught.value.required == ("images:generate",)
    assert "images:generate" in str(caught.value)


async def test_scopes_may_come_as_an_scp_list(issuer: Issuer) -> None:
    with anyio.fail_after(10):
        identity = await issuer.verifier().verify(issuer.mint(scope=DROP, scp=["images:generate", "admin"]))
    assert identity.scopes == frozenset({"images:generate", "admin"})


async def test_discovery_falls_back_to_oauth_authorization_server_metadata(issuer: Issuer) -> None:
    issuer.state.openid_configuration = False
    with anyio.fail_after(10):
        assert await issuer.verifier().verify(issuer.mint())
    assert (issuer.state.discovery_fetches, issuer.state.jwks_fetches) == (2, 1)


async def test_an_explicit_jwks_url_skips_discovery(issuer: Issuer) -> None:
    with anyio.fail_after(10):
        assert await issuer.verifier(jwks_url=f"{issuer.url}/jwks.json").verify(issuer.mint())
    assert (issuer.state.discovery_fetches, issuer.state.jwks_fetches) == (0, 1)


async def test_a_jwks_that_cannot_be_fetched_is_an_invalid_token(issuer: Issuer) -> None:
    issuer.state.jwks_down = True
    with anyio.fail_after(10):
        await refused(issuer.verifier(), issuer.mint(), "cannot fetch the issuer's signing keys")
        async with serve(issuer_app(IssuerState())) as gone_url:
            pass
        unreachable = issuer.verifier(jwks_url=f"{gone_url}/jwks.json")
        await refused(unreachable, issuer.mint(), "cannot fetch the issuer's signing keys")
        issuer.state.jwks = {"keys": []}
        issuer.state.jwks_down = False
        await refused(issuer.verifier(), issuer.mint(), "cannot fetch the issuer's signing keys")


async def test_an_issuer_outage_keeps_the_cached_keys_and_retries_sparingly(issuer: Issuer) -> None:
    verifier = issuer.verifier(jwks_cache_s=0.0)  # every verification wants a refresh
    with anyio.fail_after(10):
        assert await verifier.verify(issuer.mint())
        issuer.state.jwks_down = True
        assert await verifier.verify(issuer.mint())  # the refresh failed; the stale key still verifies
        assert await verifier.verify(issuer.mint())  # no new attempt within the failure back-off
    assert issuer.state.jwks_fetches == 2


async def test_malformed_and_oversized_tokens_are_refused_without_fetching(issuer: Issuer) -> None:
    with anyio.fail_after(10):
        await refused(issuer.verifier(), "not-a-jwt", "malformed token")
        await refused(issuer.verifier(), "a.b.c", "malformed token")
        await refused(issuer.verifier(), issuer.mint(extra="x" * 20_000), "token too large")
    assert issuer.state.jwks_fetches == 0


def test_looks_like_jwt_tells_jwts_from_api_keys_and_garbage() -> None:
    token = jwt.encode({"sub": "x"}, RSA_KEY, algorithm="RS256", headers={"kid": "k1"})
    assert looks_like_jwt(token)
    assert looks_like_jwt(hand_made({"alg": "none"}, {"sub": "x"}))  # routed to OAuth, which refuses it
    assert not looks_like_jwt("kgw_abcdef123456_" + "s" * 43)
    for garbage in ("", "a.b", "a.b.c", "...", "x.y.z.w", f"{b64url(b'{}')}.e30.sig", f"{b64url(b'[1]')}.e30.sig"):
        assert not looks_like_jwt(garbage), garbage
    assert not looks_like_jwt(token.replace(".", "+.", 1))


def test_config_refuses_symmetric_and_none_algorithms() -> None:
    for algorithms in (("RS256", "HS256"), ("none",), ()):
        with pytest.raises(ValueError, match="algorithm"):
            OAuthConfig(issuer="https://auth.example.com", audience=AUDIENCE, algorithms=algorithms)


def test_protected_resource_metadata_follows_rfc_9728() -> None:
    config = OAuthConfig(issuer="https://auth.example.com", audience=AUDIENCE)
    assert protected_resource_metadata(config) == {
        "resource": AUDIENCE,
        "authorization_servers": ["https://auth.example.com"],
        "scopes_supported": ["images:generate"],
        "bearer_methods_supported": ["header"],
        "resource_name": "Kling MCP Gateway",
    }


def test_www_authenticate_carries_the_error_the_metadata_url_and_the_scope() -> None:
    config = OAuthConfig(issuer="https://auth.example.com", audience=AUDIENCE)
    metadata_url = "https://mcp.example.com/.well-known/oauth-protected-resource/mcp"
    assert www_authenticate(config, "invalid_token", "token expired", metadata_url) == (
        f'Bearer error="invalid_token", error_description="token expired", resource_metadata="{metadata_url}"'
    )
    assert www_authenticate(config, "insufficient_scope", "needs more", metadata_url) == (
        'Bearer error="insufficient_scope", error_description="needs more", scope="images:generate", '
        f'resource_metadata="{metadata_url}"'
    )
    escaped = www_authenticate(config, "invalid_token", 'say "hi" \\ now\r\nX-Injected: 1', metadata_url)
    assert 'error_description="say \\"hi\\" \\\\ now  X-Injected: 1"' in escaped
    assert "\r" not in escaped
    assert "\n" not in escaped
