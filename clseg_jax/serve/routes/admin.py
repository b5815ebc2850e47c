"""``/admin``: what only an admin token may do: list and revoke every owner's tokens."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel, ConfigDict

from clseg_jax.serve.db import Token
from clseg_jax.serve.routes.deps import ERRORS, Admin, Id, Session

router = APIRouter()


class TokenOut(BaseModel):
    """A token's row; never the token itself (only its hash is stored)."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    owner: str
    admin: bool
    created_at: float
    expires_at: float | None


@router.get("/admin/tokens", responses={**ERRORS, 403: {}})
def list_tokens(who: Admin, s: Session) -> list[TokenOut]:
    del who
    rows = s.scalars(sa.select(Token).order_by(Token.created_at))
    return [TokenOut.model_validate(t) for t in rows]


@router.delete("/admin/tokens/{token_id}", status_code=204, responses={**ERRORS, 403: {}})
def revoke_token(who: Admin, s: Session, token_id: Id) -> Response:
    """Revokes a token at once: its next request is a 401."""
    del who
    row = s.get(Token, token_id)
    if row is None:
        raise HTTPException(404, f"no token {token_id}")
    s.delete(row)
    s.commit()
    return Response(status_code=204)
