-- wrk script of bench/ingest.py: unique, signed Instagram deliveries, one
-- direct message each. Settings come from the environment: BENCH_SECRET (the
-- app secret), BENCH_ACCOUNT, BENCH_TAG (part of every mid),
-- BENCH_SENDER_PREFIX (of every sender id), BENCH_PATH, and BENCH_OUT, the
-- file done() writes its figures to. Run with as many threads
-- as connections (-tN -cN), so each thread's answers come in the order of its
-- requests. Mids and senders match bench/loadgen.py's mid_of and sender_of.

local bit = require("bit")
local band, bor, bxor, bnot = bit.band, bit.bor, bit.bxor, bit.bnot
local rshift, lshift, ror, tobit = bit.rshift, bit.lshift, bit.ror, bit.tobit

-- SHA-256 (FIPS 180-4) on LuaJIT's 32-bit operations; sums wrap with tobit.
local K = {
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1,
  0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3,
  0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
  0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147,
  0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
  0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
  0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
  0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208,
  0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
}
for i = 1, 64 do K[i] = tobit(K[i]) end
local H0 = {
  0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
  0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
}
for i = 1, 8 do H0[i] = tobit(H0[i]) end

local w = {}

local function block(msg, at, h)
  for j = 1, 16 do
    local a, b, c, d = msg:byte(at + (j - 1) * 4, at + (j - 1) * 4 + 3)
    w[j] = bor(lshift(a, 24), lshift(b, 16), lshift(c, 8), d)
  end
  for j = 17, 64 do
    local x, y = w[j - 15], w[j - 2]
    local s0 = bxor(ror(x, 7), ror(x, 18), rshift(x, 3))
    local s1 = bxor(ror(y, 17), ror(y, 19), rshift(y, 10))
    w[j] = tobit(w[j - 16] + s0 + w[j - 7] + s1)
  end
  local a, b, c, d, e, f, g, hh = h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8]
  for j = 1, 64 do
    local s1 = bxor(ror(e, 6), ror(e, 11), ror(e, 25))
    local ch = bxor(band(e, f), band(bnot(e), g))
    local t1 = tobit(hh + s1 + ch + K[j] + w[j])
    local s0 = bxor(ror(a, 2), ror(a, 13), ror(a, 22))
    local maj = bxor(band(a, b), band(a, c), band(b, c))
    local t2 = tobit(s0 + maj)
    hh, g, f, e, d, c, b, a = g, f, e, tobit(d + t1), c, b, a, tobit(t1 + t2)
  end
  h[1], h[2], h[3], h[4] = tobit(h[1] + a), tobit(h[2] + b), tobit(h[3] + c), tobit(h[4] + d)
  h[5], h[6], h[7], h[8] = tobit(h[5] + e), tobit(h[6] + f), tobit(h[7] + g), tobit(h[8] + hh)
end

local function sha256_words(msg)
  local bits = #msg * 8
  msg = msg .. "\128" .. string.rep("\0", (55 - #msg) % 64)
    .. "\0\0\0\0" .. string.char(
      math.floor(bits / 16777216) % 256, math.floor(bits / 65536) % 256,
      math.floor(bits / 256) % 256, bits % 256)
  local h = {}
  for i = 1, 8 do h[i] = H0[i] end
  for at = 1, #msg, 64 do block(msg, at, h) end
  return h
end

local function sha256_raw(msg)
  local out = {}
  for i, v in ipairs(sha256_words(msg)) do
    out[i] = string.char(band(rshift(v, 24), 255), band(rshift(v, 16), 255),
                         band(rshift(v, 8), 255), band(v, 255))
  end
  return table.concat(out)
end

local function hmac_sha256_hex(key, msg)
  if #key > 64 then key = sha256_raw(key) end
  key = key .. string.rep("\0", 64 - #key)
  local ipad, opad = {}, {}
  for i = 1, 64 do
    local k = key:byte(i)
    ipad[i] = string.char(bxor(k, 0x36))
    opad[i] = string.char(bxor(k, 0x5c))
  end
  local inner = sha256_raw(table.concat(ipad) .. msg)
  local out = {}
  for i, v in ipairs(sha256_words(table.concat(opad) .. inner)) do
    out[i] = bit.tohex(v, 8)
  end
  return table.concat(out)
end

-- wrk's hooks ---------------------------------------------------------------

local threads = {}
local counter = 0

function setup(thread)
  thread:set("connection", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

local secret = os.getenv("BENCH_SECRET")
local account = os.getenv("BENCH_ACCOUNT")
local tag = os.getenv("BENCH_TAG")
local sender_prefix = os.getenv("BENCH_SENDER_PREFIX")
local path = os.getenv("BENCH_PATH")
local body_format = '{"object":"instagram","entry":[{"id":"%s","time":%d,'
  .. '"messaging":[{"sender":{"id":"%s"},"recipient":{"id":"%s"},'
  .. '"timestamp":%d,"message":{"mid":"%s","text":"hello there"}}]}]}'

sent, answered, bad = 0, 0, ""
local live = false

-- wrk calls delay() before each request it sends, but not before the one
-- request() call it makes on the first thread to check the script; that
-- call must not use up a mid.
function delay()
  live = true
  return 0
end

function request()
  if not live then
    return wrk.format("POST", path, {}, "{}")
  end
  sent = sent + 1
  local ms = os.time() * 1000
  local body = string.format(body_format, account, ms,
    string.format("%s%03d%09d", sender_prefix, connection, sent), account, ms,
    string.format("bench-%s-%d-%d", tag, connection, sent))
  local headers = {
    ["Content-Type"] = "application/json",
    ["X-Hub-Signature-256"] = "sha256=" .. hmac_sha256_hex(secret, body),
  }
  return wrk.format("POST", path, headers, body)
end

function response(status, headers, body)
  answered = answered + 1
  if status ~= 200 then
    bad = bad .. string.format(',["%d",%d]', answered, status)
  end
end

function done(summary, latency, requests)
  local out = assert(io.open(os.getenv("BENCH_OUT"), "w"))
  local e = summary.errors
  out:write(string.format(
    '{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,'
      .. '"timeout":%d,"status_errors":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout,
    e.status, latency:percentile(50), latency:percentile(99)))
  for _, thread in ipairs(threads) do
    local list = thread:get("bad")
    out:write(string.format("[%d,%d,%d,[%s]]\n", thread:get("connection"),
      thread:get("sent"), thread:get("answered"), list:sub(2)))
  end
  out:close()
end
