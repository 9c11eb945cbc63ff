"""The Kafka security settings: environment parsing, validation messages, no secret leakage.

Pure: no broker. The connection itself is tested on the secured broker in
tests/integration/test_secure_connection.py.
"""

from __future__ import annotations

import argparse
import ssl
from pathlib import Path

import pytest

from saga.adapters.kafka_settings import KafkaSecurity, KafkaSettingsError
from saga.cli.common import CliError, common_options, kafka_security

SECRET = "s3cr3t-Pa55word"
CA_PEM = (
    "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUaW52YWxpZA==\n-----END CERTIFICATE-----\n"
)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """A PEM-looking CA, a DER-looking file, a password file."""
    ca = tmp_path / "ca.pem"
    ca.write_text(CA_PEM)
    der = tmp_path / "ca.der"
    der.write_bytes(b"\x30\x82\x01\xb3binary")
    pw = tmp_path / "password"
    pw.write_text(SECRET + "\n")
    return {"ca": ca, "der": der, "pw": pw, "missing": tmp_path / "nope.pem"}


def scram(**more: str) -> dict[str, str]:
    env = {
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": "payment",
        "KAFKA_SASL_PASSWORD": SECRET,
    }
    env.update(more)
    return env


def error_of(env: dict[str, str]) -> str:
    with pytest.raises(KafkaSettingsError) as caught:
        KafkaSecurity.from_env(env)
    assert SECRET not in str(caught.value)
    return str(caught.value)


def test_the_defaults_are_plaintext_without_sasl() -> None:
    s = KafkaSecurity.from_env({})
    assert s.security_protocol == "PLAINTEXT"
    assert s.sasl_mechanism is None
    assert s.aiokafka_options() == {"security_protocol": "PLAINTEXT"}
    assert s.describe() == "PLAINTEXT"


def test_the_environment_gives_every_setting(files: dict[str, Path]) -> None:
    s = KafkaSecurity.from_env(scram(KAFKA_SSL_CA_LOCATION=str(files["ca"])))
    assert (s.security_protocol, s.sasl_mechanism, s.sasl_username) == (
        "SASL_SSL",
        "SCRAM-SHA-512",
        "payment",
    )
    assert s.sasl_password is not None
    assert s.sasl_password.get_secret_value() == SECRET
    assert s.ssl_ca_location == files["ca"]
    assert s.ssl_check_hostname is True
    assert s.describe() == f"SASL_SSL, SCRAM-SHA-512 as payment, CA {files['ca']}"


@pytest.mark.parametrize(
    ("value", "checked"), [("https", True), ("HTTPS", True), ("", False), ("none", False)]
)
def test_endpoint_identification_is_read_as_kafka_names_it(value: str, checked: bool) -> None:
    env = {"KAFKA_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM": value}
    assert KafkaSecurity.from_env(env).ssl_check_hostname is checked


def test_an_unknown_endpoint_identification_algorithm_is_refused() -> None:
    message = error_of({"KAFKA_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM": "ldap"})
    assert "KAFKA_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM='ldap'" in message


def test_the_password_file_is_read_without_its_newline(files: dict[str, Path]) -> None:
    env = scram(KAFKA_SASL_PASSWORD_FILE=str(files["pw"]))
    del env["KAFKA_SASL_PASSWORD"]
    s = KafkaSecurity.from_env(env)
    assert s.aiokafka_options()["sasl_plain_password"] == SECRET
    assert s.aiokafka_options()["sasl_plain_username"] == "payment"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"KAFKA_SECURITY_PROTOCOL": "TLS"},
            "security_protocol (KAFKA_SECURITY_PROTOCOL): Input should be 'PLAINTEXT'",
        ),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"},
            "needs a SASL mechanism: set sasl_mechanism (KAFKA_SASL_MECHANISM)",
        ),
        (
            {"KAFKA_SASL_MECHANISM": "PLAIN"},
            "sasl_mechanism (KAFKA_SASL_MECHANISM) is PLAIN, but security_protocol "
            "(KAFKA_SECURITY_PROTOCOL) is PLAINTEXT, which does not use SASL",
        ),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-256"},
            "but security_protocol (KAFKA_SECURITY_PROTOCOL) is SSL",
        ),
        (
            {**scram(), "KAFKA_SASL_USERNAME": ""},
            "SCRAM-SHA-512 needs a user: set sasl_username (KAFKA_SASL_USERNAME)",
        ),
        (
            {**scram(), "KAFKA_SASL_PASSWORD": ""},
            "needs the password of user 'payment': set sasl_password (KAFKA_SASL_PASSWORD) or "
            "sasl_password_file (KAFKA_SASL_PASSWORD_FILE)",
        ),
        (
            {**scram(), "KAFKA_SASL_MECHANISM": "OAUTHBEARER"},
            "OAUTHBEARER needs a token provider: set sasl_oauthbearer_token_provider "
            "(KAFKA_SASL_OAUTHBEARER_TOKEN_PROVIDER)",
        ),
    ],
)
def test_each_broken_rule_names_the_setting(env: dict[str, str], expected: str) -> None:
    assert expected in error_of(env)


def test_a_password_and_a_password_file_are_refused(files: dict[str, Path]) -> None:
    message = error_of(scram(KAFKA_SASL_PASSWORD_FILE=str(files["pw"])))
    assert "both sasl_password (KAFKA_SASL_PASSWORD) and sasl_password_file" in message


def test_a_missing_file_is_named(files: dict[str, Path]) -> None:
    message = error_of(scram(KAFKA_SSL_CA_LOCATION=str(files["missing"])))
    assert f"ssl_ca_location (KAFKA_SSL_CA_LOCATION): cannot read {files['missing']}" in message
    assert "does not exist" in message


def test_an_unreadable_password_file_is_named(files: dict[str, Path]) -> None:
    env = scram(KAFKA_SASL_PASSWORD_FILE=str(files["pw"].parent))  # a directory: unreadable
    del env["KAFKA_SASL_PASSWORD"]
    assert "sasl_password_file (KAFKA_SASL_PASSWORD_FILE): cannot read" in error_of(env)


def test_a_ca_file_that_is_not_pem_is_refused(files: dict[str, Path]) -> None:
    message = error_of(scram(KAFKA_SSL_CA_LOCATION=str(files["der"])))
    assert f"{files['der']} is not the PEM file of the CA certificate" in message


def test_a_certificate_needs_its_key(files: dict[str, Path]) -> None:
    message = error_of(scram(KAFKA_SSL_CERTIFICATE_LOCATION=str(files["ca"])))
    assert "without its private key: set ssl_key_location (KAFKA_SSL_KEY_LOCATION)" in message


def test_tls_files_without_a_tls_protocol_are_refused(files: dict[str, Path]) -> None:
    message = error_of({"KAFKA_SSL_CA_LOCATION": str(files["ca"])})
    assert "which does not use TLS: set KAFKA_SECURITY_PROTOCOL to SSL or SASL_SSL" in message


def test_a_ca_that_openssl_cannot_load_is_a_settings_error(files: dict[str, Path]) -> None:
    s = KafkaSecurity.from_env(scram(KAFKA_SSL_CA_LOCATION=str(files["ca"])))
    with pytest.raises(KafkaSettingsError, match=r"holds no usable CA certificate"):
        s.ssl_context()


def test_the_system_cas_and_the_hostname_check_make_the_tls_context() -> None:
    s = KafkaSecurity(security_protocol="SSL", ssl_check_hostname=False)
    context = s.aiokafka_options()["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname is False
    assert s.describe() == "SSL, CA of the system, no hostname check"


def test_secrets_stay_out_of_repr_str_and_json(files: dict[str, Path]) -> None:
    s = KafkaSecurity(**{**KafkaSecurity.env_values(scram()), "ssl_key_password": SECRET})
    dumped = s.model_dump(mode="json")
    for text in (repr(s), str(s), str(dumped), s.describe()):
        assert SECRET not in text
    assert dumped["sasl_password"] == "**********"


def test_a_settings_error_does_not_contain_the_password() -> None:
    with pytest.raises(KafkaSettingsError) as caught:
        KafkaSecurity(sasl_mechanism="PLAIN", sasl_username="u", sasl_password=SECRET)
    assert "does not use SASL" in str(caught.value)
    assert SECRET not in str(caught.value)
    assert SECRET not in repr(caught.value)
    assert caught.value.__cause__ is None


def test_a_wrongly_typed_secret_is_refused_without_echoing_it() -> None:
    with pytest.raises(KafkaSettingsError) as caught:
        KafkaSecurity(sasl_password=[SECRET])
    assert "sasl_password (KAFKA_SASL_PASSWORD)" in str(caught.value)
    assert SECRET not in str(caught.value)


class _Tokens:
    async def token(self) -> str:
        return "a.b.c"


def test_a_token_provider_is_resolved_from_module_and_attribute() -> None:
    s = KafkaSecurity(
        security_protocol="SASL_SSL",
        sasl_mechanism="OAUTHBEARER",
        sasl_oauthbearer_token_provider=f"{__name__}:_Tokens",
    )
    assert isinstance(s.aiokafka_options()["sasl_oauth_token_provider"], _Tokens)
    assert s.describe() == f"SASL_SSL, OAUTHBEARER with {__name__}:_Tokens, CA of the system"


def test_a_token_provider_that_does_not_import_is_named() -> None:
    s = KafkaSecurity(
        security_protocol="SASL_SSL",
        sasl_mechanism="OAUTHBEARER",
        sasl_oauthbearer_token_provider="no_such_module_xyz:Tokens",
    )
    with pytest.raises(KafkaSettingsError, match=r"KAFKA_SASL_OAUTHBEARER_TOKEN_PROVIDER"):
        s.aiokafka_options()


def parse(*argv: str) -> argparse.Namespace:
    return common_options().parse_args(list(argv))


def test_flags_override_the_environment(
    monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]
) -> None:
    for name, value in scram(KAFKA_SASL_USERNAME="from-env").items():
        monkeypatch.setenv(name, value)
    args = parse(
        "--sasl-username", "from-flag", "--sasl-mechanism", "SCRAM-SHA-256",
        "--ssl-ca-location", str(files["ca"]), "--no-ssl-hostname-check",
    )  # fmt: skip
    s = kafka_security(args)
    assert (s.sasl_username, s.sasl_mechanism) == ("from-flag", "SCRAM-SHA-256")
    assert s.ssl_ca_location == files["ca"]
    assert s.ssl_check_hostname is False
    assert s.sasl_password is not None  # from the environment


def test_a_password_file_flag_replaces_the_password_variable(
    monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]
) -> None:
    for name, value in scram().items():
        monkeypatch.setenv(name, value)
    s = kafka_security(parse("--sasl-password-file", str(files["pw"])))
    assert s.sasl_password is None
    assert s.sasl_password_file == files["pw"]


def test_there_is_no_password_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--sasl-password", SECRET)
    err = capsys.readouterr().err
    assert "there is no --sasl-password" in err
    assert SECRET not in err


def test_kafka_bootstrap_servers_is_read_and_the_saga_variable_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SAGA_KAFKA_BOOTSTRAP", raising=False)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka:9093")
    assert parse().bootstrap_servers == "kafka:9093"
    monkeypatch.setenv("SAGA_KAFKA_BOOTSTRAP", "saga:9092")
    assert parse().bootstrap_servers == "saga:9092"


def test_invalid_settings_are_one_cli_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in scram(KAFKA_SASL_USERNAME="").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(CliError, match=r"^Kafka settings: .*KAFKA_SASL_USERNAME") as caught:
        kafka_security(parse())
    assert SECRET not in str(caught.value)
