"""Throw-away certificates for the TLS tests: a CA, node certificates it signs, and the
wrong kinds (another CA, expired, named for another node)."""
import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fastraft.transport.link import TlsConfig

_NOW = datetime.datetime.now(datetime.timezone.utc)


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class CA:
    def __init__(self, directory, name="fastraft test CA"):
        self.directory = directory
        self.key = _key()
        self.cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(_NOW - datetime.timedelta(days=1))
                     .not_valid_after(_NOW + datetime.timedelta(days=30))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                     .sign(self.key, hashes.SHA256()))
        self.cafile = self._write(name.replace(" ", "-") + ".pem", self.cert.public_bytes(
            serialization.Encoding.PEM))

    def _write(self, name, data):
        path = os.path.join(self.directory, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def issue(self, cn, *, expired=False, trust=None, node_names=False):
        """A TlsConfig with a certificate for ``cn`` signed by this CA, trusting
        ``trust`` (a CA; this one by default)."""
        key = _key()
        after = _NOW - datetime.timedelta(days=1) if expired else _NOW + datetime.timedelta(days=30)
        cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(_NOW - datetime.timedelta(days=2)).not_valid_after(after)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), False)
                .sign(self.key, hashes.SHA256()))
        tag = f"{cn}-{id(cert)}"
        certfile = self._write(tag + ".crt", cert.public_bytes(serialization.Encoding.PEM))
        keyfile = self._write(tag + ".key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        return TlsConfig(certfile=certfile, keyfile=keyfile,
                         cafile=(trust or self).cafile, node_names=node_names)
