-- wrk script for scripts/bench-queue.sh: rotates over the users' tokens (tokens.txt, one per
-- line) and sends the request named by the MODE environment variable:
--   get  GET /queue/            (served from the replica's cache after the first)
--   put  PUT /queue/            (a small snapshot, last write wins)
--   ops  POST /queue/ops        (one seek op: one revision per request)
local tokens = {}
local mode = os.getenv("MODE") or "get"
local counter = 0

function init(args)
  for line in io.lines(os.getenv("TOKENS")) do
    tokens[#tokens + 1] = line
  end
end

function request()
  counter = counter + 1
  local token = tokens[(counter % #tokens) + 1]
  local headers = { ["Authorization"] = "Bearer " .. token, ["Content-Type"] = "application/json" }
  if mode == "put" then
    local body = '{"state":{"track_ids":["t1","t2","t3"],"current_index":' .. (counter % 3) .. '}}'
    return wrk.format("PUT", "/queue/", headers, body)
  elseif mode == "ops" then
    local body = '{"ops":[{"op":"seek","progress_ms":' .. counter .. '}]}'
    return wrk.format("POST", "/queue/ops", headers, body)
  end
  return wrk.format("GET", "/queue/", headers)
end

function response(status, headers, body)
  if status ~= 200 then
    errors = (errors or 0) + 1
  end
end
