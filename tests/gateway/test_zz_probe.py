import httpx, json
from tests import factories as f

def test_probe(live_gateway):
    key = f.ApiKeyFactory()
    h = {"authorization": f"Bearer {key.secret}"}
    for p in ["/v1/files/file-%00", "/v1/batches/batch_%00", "/v1/requests/req_%00", "/v1/files?after=%00",
              "/v1/batches?after=%00", "/v1/budget?budget_id=%00", "/v1/files?purpose=%00", "/v1/files?limit=null",
              "/v1/files/file-%01/content", "/v1/files?limit=99999999999999999999999"]:
        r = httpx.get(live_gateway + p, headers=h)
        print("PROBE", p, r.status_code, r.text[:200])
    r = httpx.get(live_gateway + "/v1/openapi.json")
    print("PROBE openapi", r.status_code, json.dumps(r.json())[:1500])
