"""The gateway's listening socket: its connections run with TCP_NODELAY (asyncio, under uvicorn, sets it only
on sockets whose protocol is IPPROTO_TCP; with Nagle's algorithm on, each response's second write waits for
the SDK's delayed ACK, about 40 ms a request)."""

from __future__ import annotations

import asyncio
import socket

from twinkle_tinker import cli


def test_connections_of_the_gateway_socket_have_tcp_nodelay() -> None:
    async def accepted_nodelay() -> int:
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
                accepted = transport.get_extra_info("socket")
                seen.set_result(accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        sock = cli.listening_socket("127.0.0.1", 0)
        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)  # as uvicorn serves sockets
        try:
            _, writer = await asyncio.open_connection(*sock.getsockname())
            value = await asyncio.wait_for(seen, 30)
            writer.close()
            return value
        finally:
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0
