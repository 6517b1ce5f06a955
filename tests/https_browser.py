"""A minimal HTTPS browser for integration tests: cookies, forms, no magic.

It trusts exactly the test's self-signed certificate, keeps cookies per
instance (one instance = one browser profile), and never follows redirects,
so tests see every 303 the proxy sends.
"""
import html
import http.client
import json
import re
import ssl
import urllib.parse
from http.cookies import SimpleCookie
from typing import Dict, Optional, Tuple

import attr


@attr.s(auto_attribs=True)
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.body)

    def header(self, name: str) -> Optional[str]:
        return self.headers.get(name)


class Browser:

    def __init__(self, port: int, cafile: str, host: str = "localhost") -> None:
        self.port = port
        self.host = host
        self.context = ssl.create_default_context(cafile=cafile)
        self.cookies: Dict[str, str] = {}

    def request(self, method: str, path: str, body: Optional[bytes] = None,
                headers: Optional[Dict[str, str]] = None, send_cookies: bool = True) -> Response:
        connection = http.client.HTTPSConnection(self.host, self.port, context=self.context,
                                                 timeout=60)
        try:
            all_headers = dict(headers or {})
            if send_cookies and self.cookies:
                extra = all_headers.pop("Cookie", None)
                pairs = ["%s=%s" % item for item in self.cookies.items()]
                all_headers["Cookie"] = "; ".join(pairs + ([extra] if extra else []))
            connection.request(method, path, body=body, headers=all_headers)
            raw = connection.getresponse()
            response = Response(raw.status, raw.headers, raw.read())
        finally:
            connection.close()
        for line in response.headers.get_all("Set-Cookie") or []:
            cookie = SimpleCookie()
            cookie.load(line)
            for name, morsel in cookie.items():
                if morsel["max-age"] == "0" or morsel.value == "":
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        return response

    def get(self, path: str, **kwargs) -> Response:
        return self.request("GET", path, **kwargs)

    def post_form(self, path: str, fields: Dict[str, str], **kwargs) -> Response:
        headers = dict(kwargs.pop("headers", {}) or {})
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        return self.request("POST", path, body=urllib.parse.urlencode(fields).encode(),
                            headers=headers, **kwargs)

    @staticmethod
    def hidden_field(page: Response, name: str) -> str:
        match = re.search(r'name="%s"[^>]*value="([^"]*)"|value="([^"]*)"[^>]*name="%s"'
                          % (name, name), page.text)
        if match is None:
            raise AssertionError("no field %s in page:\n%s" % (name, page.text[:2000]))
        return html.unescape(match.group(1) or match.group(2))

    def log_in(self, username: str, password: str) -> Response:
        form = self.get("/auth/login")
        token = self.hidden_field(form, "csrf_token")
        return self.post_form("/auth/login", {"username": username, "password": password,
                                              "csrf_token": token})

    def log_out(self) -> Response:
        page = self.get("/auth/logout")
        token = self.hidden_field(page, "csrf_token")
        return self.post_form("/auth/logout", {"csrf_token": token})

    def session_cookie(self) -> Tuple[str, str]:
        (item,) = [(k, v) for k, v in self.cookies.items() if "session" in k]
        return item
