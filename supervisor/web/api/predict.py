"""`POST /predict`, the seed guide's shape ({"prompt", "images": [base64...]}), as a chat completion and back."""

from __future__ import annotations

from typing import Any

from ...media.images import ImageError


def predict_to_chat(doc: dict[str, Any]) -> dict[str, Any]:
    """The seed guide's `/predict` body ({"prompt", "images": [base64...]}) as a chat completion request."""
    prompt = doc.get("prompt")
    if not isinstance(prompt, str):
        raise ImageError(400, "predict: 'prompt' must be a string")
    images = doc.get("images") or []
    if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        raise ImageError(400, "predict: 'images' must be a list of base64 strings")
    content: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
    for img in images:
        url = img if img.startswith(("data:", "http://", "https://")) else "data:image/jpeg;base64," + img
        content.append({"type": "image_url", "image_url": {"url": url}})
    chat: dict[str, Any] = {"messages": [{"role": "user", "content": content}], "stream": False}
    for key in ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop"):
        if key in doc:
            chat[key] = doc[key]
    if "n_predict" in doc and "max_tokens" not in doc:
        chat["max_tokens"] = doc["n_predict"]
    return chat


def chat_to_predict(resp: dict[str, Any]) -> dict[str, Any]:
    choice = (resp.get("choices") or [{}])[0]
    return {"response": (choice.get("message") or {}).get("content", ""), "finish_reason": choice.get("finish_reason"),
            "model": resp.get("model"), "usage": resp.get("usage")}
