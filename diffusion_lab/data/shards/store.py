"""Where a shard set lives: a folder (``LocalRoot``) or an ``s3://bucket/prefix`` (``S3Root``, AWS S3
or an S3-compatible store reached through boto3's own credential chain)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from diffusion_lab.utils.errors import ConfigError

S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION")
ENV_HINT = (
    "Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary keys) in the environment, or "
    "AWS_PROFILE for a profile in ~/.aws; for an S3-compatible store (MinIO, Ceph, Cloudflare R2, ...) also AWS_ENDPOINT_URL "
    "(or AWS_ENDPOINT_URL_S3) and AWS_DEFAULT_REGION. Credentials are read from the environment, never from the config."
)


def is_remote(root: str | Path) -> bool:
    """Whether ``root`` is an object-store URL (``s3://...``) rather than a folder."""
    return "://" in str(root)


class LocalRoot:
    """A shard set in a folder (local disk, or a shared filesystem every node mounts)."""

    def __init__(self, root: str | Path) -> None:
        self.path = Path(root).expanduser()
        self.url = str(self.path)

    def join(self, *parts: str) -> str:
        return str(self.path.joinpath(*parts))

    def is_file(self, *parts: str) -> bool:
        return self.path.joinpath(*parts).is_file()

    def read_text(self, *parts: str) -> str:
        return self.path.joinpath(*parts).read_text()


class Unreachable(ConfigError):
    """The object store did not answer (slow to find out: config resolution does not ask twice)."""


class S3Root:
    """A shard set under ``s3://bucket/prefix`` (AWS S3 or an S3-compatible store), reached with
    boto3's own credential chain and endpoint: the ``AWS_*`` environment variables of ``ENV_HINT``
    (or a profile), as litdata's readers reach it. ``key`` is the config key that named it: every
    failure to reach it is a ``ConfigError`` naming the key and the variables to set."""

    def __init__(self, url: str, key: str = "data.root") -> None:
        scheme, _, rest = str(url).partition("://")
        if scheme != "s3":
            raise ConfigError(
                f"{key}={url}: {scheme}:// is not supported; object-store roots are s3:// (AWS S3, or an S3-compatible store "
                f"through AWS_ENDPOINT_URL; this is what is tested). Mount the bucket (e.g. gcsfuse for gs://) and set {key} "
                f"to the mounted folder, or use the store's S3-compatible endpoint."
            )
        self.bucket, _, prefix = rest.partition("/")
        self.prefix, self.key = prefix.strip("/"), key
        if not self.bucket:
            raise ConfigError(f"{key}={url} names no bucket: write s3://<bucket>/<prefix>.")
        self.url = "/".join(["s3:/", self.bucket, *([self.prefix] if self.prefix else [])])
        import boto3
        import botocore.config

        session = boto3.Session()
        if session.get_credentials() is None:
            raise ConfigError(f"{key}={url}: no S3 credentials were found. {ENV_HINT}")
        # a few quick retries: a wrong endpoint must be an error in seconds, not litdata's 1000 attempts
        config = botocore.config.Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})
        self.client = session.client("s3", config=config)
        self.endpoint: str = self.client.meta.endpoint_url

    def __getstate__(self) -> dict:  # a boto3 client does not pickle (spawned processes): made again
        return {k: v for k, v in self.__dict__.items() if k != "client"}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["url"], state["key"])

    def _key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p.strip("/"))

    def join(self, *parts: str) -> str:
        return f"s3://{self.bucket}/{self._key(*parts)}"

    @contextmanager
    def _errors(self):
        """boto3's failures -> one ``ConfigError`` paragraph (missing objects are the caller's)."""
        from botocore.exceptions import ClientError, ConnectTimeoutError, EndpointConnectionError, NoCredentialsError

        try:
            yield
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket":
                raise ConfigError(
                    f"{self.key}={self.url}: the bucket {self.bucket!r} does not exist at {self.endpoint}. Create it, or fix the "
                    f"bucket name (another store: set AWS_ENDPOINT_URL to its address)."
                ) from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "InvalidClientTokenId"):
                raise ConfigError(f"{self.key}={self.url}: {self.endpoint} refused these credentials ({code}). {ENV_HINT}") from None
            raise
        except (EndpointConnectionError, ConnectTimeoutError) as e:
            raise Unreachable(
                f"{self.key}={self.url}: cannot reach the object store at {self.endpoint} ({e}). Check the network, or set "
                f"AWS_ENDPOINT_URL to the address of your S3-compatible store (e.g. http://host:9000)."
            ) from None
        except NoCredentialsError:
            raise ConfigError(f"{self.key}={self.url}: no S3 credentials were found. {ENV_HINT}") from None

    def read_bytes(self, *parts: str) -> bytes | None:
        """The object's bytes, or None when there is none."""
        from botocore.exceptions import ClientError

        with self._errors():
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._key(*parts))["Body"].read()
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise

    def read_text(self, *parts: str) -> str:
        raw = self.read_bytes(*parts)
        if raw is None:
            raise FileNotFoundError(self.join(*parts))
        return raw.decode()

    def is_file(self, *parts: str) -> bool:
        from botocore.exceptions import ClientError

        with self._errors():
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._key(*parts))
                return True
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                    return False
                raise

    def _keys(self, max_keys: int | None = None):
        """The keys under the prefix (all of them, or the first ``max_keys``)."""
        prefix = f"{self.prefix}/" if self.prefix else ""
        with self._errors():
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, PaginationConfig={"MaxItems": max_keys} if max_keys else {}
            )
            for page in pages:
                yield from (obj["Key"] for obj in page.get("Contents", []))

    def has_objects(self) -> bool:
        return any(True for _ in self._keys(max_keys=1))

    def upload(self, local: Path, *parts: str) -> None:
        """``local`` (a file, or a folder with everything under it) to ``<prefix>/<parts>``."""
        files = [local] if local.is_file() else sorted(f for f in local.rglob("*") if f.is_file())
        with self._errors():
            for f in files:
                rel = [] if f == local else [f.relative_to(local).as_posix()]
                self.client.upload_file(str(f), self.bucket, self._key(*parts, *rel))

    def delete_all(self, first: str) -> None:
        """Every object under the prefix, the file named ``first`` (the manifest) before the rest, so
        the set stops looking complete at once."""
        keys = sorted(self._keys(), key=lambda k: not k.endswith(f"/{first}") and k != first)
        with self._errors():
            for i in range(0, len(keys), 1000):
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True})


ShardRoot = LocalRoot | S3Root


def shard_root(root: str | Path, key: str = "data.root") -> ShardRoot:
    """``S3Root`` for an object-store URL (``key`` names it in messages), else ``LocalRoot``."""
    return S3Root(str(root), key) if is_remote(root) else LocalRoot(root)
