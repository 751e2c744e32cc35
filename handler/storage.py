"""Results too large to return inline go to an S3-compatible bucket, returned as presigned URLs.

boto3 is used directly rather than the SDK's `rp_upload` helpers: without bucket credentials
those only log a warning and return a local file path, which a caller would take for a URL.
Here a missing or failing bucket is an error the caller sees.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from runpod.serverless.utils.rp_upload import extract_region_from_url

from engine.settings import BucketSettings

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9._-]")


class UploadError(RuntimeError):
    """The bucket did not take the result; the message is meant for the client."""


@dataclass(frozen=True)
class UploadedObject:
    url: str
    expires_in_s: int
    bucket: str
    key: str


class ResultBucket:
    def __init__(self, settings: BucketSettings) -> None:
        self.settings = settings
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.endpoint_url,
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_access_key,
            # The SDK's region rule (<bucket>.s3.<region>.amazonaws.com); None lets boto3
            # fall back to AWS_DEFAULT_REGION.
            region_name=extract_region_from_url(settings.endpoint_url),
            config=Config(
                signature_version="s3v4", retries={"max_attempts": 3, "mode": "standard"}
            ),
        )

    def upload(
        self, data: bytes, *, job_id: str, extension: str, content_type: str
    ) -> UploadedObject:
        # Without BUCKET_NAME, the SDK's convention: a bucket per month. With the bucket in the
        # endpoint host (as RunPod's upload docs show), that name ends up a key prefix.
        bucket = self.settings.name or time.strftime("%m-%y")
        key = f"sharp/{_UNSAFE_KEY_CHARS.sub('_', job_id)}/{uuid.uuid4().hex}{extension}"
        try:
            self._client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)
            url = self._client.generate_presigned_url(
                "get_object",
                Params={"Bucket": bucket, "Key": key},
                ExpiresIn=self.settings.url_expiry_s,
            )
        except (BotoCoreError, ClientError) as error:
            raise UploadError(
                f"uploading the result to bucket {bucket!r} at {self.settings.endpoint_url} "
                f"failed: {error}. Check the BUCKET_* settings of the endpoint."
            ) from error
        return UploadedObject(url, self.settings.url_expiry_s, bucket, key)
