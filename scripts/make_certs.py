#!/usr/bin/env python3
"""LAB USE ONLY: a throw-away CA, a SuperLink TLS certificate and SuperNode authentication keys.

    python scripts/make_certs.py deploy/certs --nodes 4 --san 192.168.1.20 --san my-laptop.local

writes into the folder given (created if needed, files never overwritten unless --force):

    ca.crt, ca.key                 a self-signed certificate authority (the "root certificate"
                                   every SuperNode and the `flwr` CLI trust: --root-certificates)
    server.pem, server.key         the SuperLink's certificate, signed by that CA, for
                                   localhost, 127.0.0.1, ::1, superlink and fleet-proxy (compose's
                                   service names)
                                   and every --san given (the laptop's LAN address for a Pi)
    supernode-<i>.key / .pub       one ECDSA P-384 key pair per SuperNode, in OpenSSH format:
                                   `flwr supernode register supernode-<i>.pub <connection>`
                                   on the operator's side, `flower-supernode
                                   --auth-supernode-private-key supernode-<i>.key` on the node

Why this is for a lab only: the CA key sits unencrypted next to the certificates, nothing is
revocable, and anyone holding ca.key can impersonate the SuperLink. For a real deployment use your
organisation's CA (or a public one for a public DNS name) and generate each SuperNode's key on the
SuperNode itself (`ssh-keygen -t ecdsa -b 384 -N "" -f supernode-1`), sending only the .pub file.

Built on the `cryptography` package (a Flower dependency, so it is always installed with the
app); no `openssl` binary is needed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# superlink, fleet-proxy: the compose service names SuperNodes and the ServerApp dial (docker-compose.yml)
DEFAULT_SANS = ("localhost", "127.0.0.1", "::1", "superlink", "fleet-proxy")
LAB_LABEL = "LAB USE ONLY - fl-app test CA"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, LAB_LABEL),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(entry: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(entry))
    except ValueError:
        return x509.DNSName(entry)


def _write(path: Path, data: bytes, private: bool, force: bool) -> None:
    """Write `data` to `path`, a private key readable by its owner alone FROM ITS CREATION: the file is
    created with mode 0600 (0644 for certificates and public keys) by os.open itself, whatever the
    umask, and re-moded before the first byte when --force replaces an older file. (Writing first and
    chmod-ing after leaves a window in which anyone may open the key.) Never follows a symlink."""
    mode = 0o600 if private else 0o644
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise FileExistsError(f"{path} exists; pass --force to overwrite it") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, mode)  # the umask may have narrowed a new file; an old one keeps its mode otherwise
        f.write(data)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def make_ca(days: int) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("fl-app lab CA")).issuer_name(_name("fl-app lab CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_server_cert(ca_key, ca_cert: x509.Certificate, sans: list[str],
                     days: int) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(sans[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([_san(s) for s in sans]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def make_node_keys(name: str) -> tuple[bytes, bytes]:
    """An ECDSA P-384 key pair as Flower 1.41 reads them: OpenSSH private key, OpenSSH public key."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" {name}\n".encode()


def make_certs(out: Path, nodes: int = 3, sans: list[str] | None = None, days: int = 30,
               force: bool = False, node_prefix: str = "supernode-") -> dict[str, Path]:
    """Write the CA, the SuperLink certificate and `nodes` SuperNode key pairs into `out`.

    Private keys (*.key) are mode 0600 from their creation on (`_write`); a new folder is 0700."""
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    all_sans = list(dict.fromkeys([*DEFAULT_SANS, *(sans or [])]))
    ca_key, ca_cert = make_ca(days)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, all_sans, days)
    files = {"ca_cert": out / "ca.crt", "ca_key": out / "ca.key", "server_cert": out / "server.pem",
             "server_key": out / "server.key"}
    _write(files["ca_key"], _pem_key(ca_key), True, force)
    _write(files["ca_cert"], ca_cert.public_bytes(serialization.Encoding.PEM), False, force)
    _write(files["server_key"], _pem_key(server_key), True, force)
    _write(files["server_cert"], server_cert.public_bytes(serialization.Encoding.PEM), False, force)
    for i in range(1, nodes + 1):
        name = f"{node_prefix}{i}"
        private, public = make_node_keys(name)
        files[f"{name}.key"], files[f"{name}.pub"] = out / f"{name}.key", out / f"{name}.pub"
        _write(out / f"{name}.key", private, True, force)
        _write(out / f"{name}.pub", public, False, force)
    _write(out / "README.txt", f"{LAB_USE_ONLY_NOTE}\nSANs of server.pem: {', '.join(all_sans)}\n"
           f"Valid for {days} days.\n".encode(), False, True)
    return files


LAB_USE_ONLY_NOTE = ("LAB USE ONLY. Generated by scripts/make_certs.py: a throw-away CA whose private key (ca.key) "
                     "is stored unencrypted here. Never use these files outside a test bench; never commit them.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="LAB USE ONLY: see the module docstring (python "
                                            "scripts/make_certs.py --help) for what that means.")
    parser.add_argument("out", type=Path, help="folder to write into (created if missing)")
    parser.add_argument("--nodes", type=int, default=3, help="SuperNode key pairs to create (default 3)")
    parser.add_argument("--san", action="append", default=[],
                        help="extra DNS name or IP address for the SuperLink certificate (repeatable), "
                             "e.g. the laptop's LAN address that Raspberry Pis connect to")
    parser.add_argument("--days", type=int, default=30, help="validity in days (default 30)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(argv)
    if args.nodes < 0 or args.days < 1:
        parser.error("--nodes must be >= 0 and --days >= 1")
    try:
        files = make_certs(args.out, args.nodes, args.san, args.days, args.force)
    except FileExistsError as exc:
        print(f"make_certs: {exc}", file=sys.stderr)
        return 1
    print(f"LAB USE ONLY: wrote {len(files)} files to {args.out.resolve()}")
    for label, path in files.items():
        print(f"  {label:16s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
