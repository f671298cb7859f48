"""Kombu's filesystem transport (the embedded default's broker), with atomic message writes.

The stock transport creates a message file and then writes into it; a worker polling the folder
can pick up the still empty file in between, and dies on a JSON decode error. Here a message is
written under a temporary name the consumer ignores and then renamed into place (atomic on POSIX),
so a consumer only ever sees whole messages.

A filesystem broker has no host: the transport declares no default host name, so kombu does not
warn "No hostname was supplied. Reverting to default 'localhost'" on the first publish of every
process (the embedded quickstart printed it on its first async request).
"""

from __future__ import annotations

import os
import uuid
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = os.path.join(self.data_folder_out, f".{name}.partial")
        try:
            with open(partial, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel

    @property
    def default_connection_params(self):
        return {"port": self.default_port}
