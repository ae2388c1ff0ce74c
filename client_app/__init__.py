"""The ClientApp: reports its device, then executes whatever jobs the server sends."""
